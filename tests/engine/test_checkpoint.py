"""Checkpoints: peft format both ways, exact resume with optimizer state, corruption detection."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tinkex.engine import AdamHyper, EngineError, ForwardBackwardJob, LoraSpec, SampleJob

from .conftest import M, full_logprobs, random_datum

HYPER = AdamHyper(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=1.0)


def _train(engine, aid, data, steps=1):
    loss = None
    for _ in range(steps):
        (result,) = engine.forward_backward([ForwardBackwardJob(aid, data, "cross_entropy")])
        loss = result.metrics["loss:sum"]
        engine.optim_step(aid, HYPER)
    return loss


@pytest.fixture(scope="module")
def trained(engine, tmp_path_factory):
    """An adapter after 3 steps, saved with its optimizer state; then trained one more step."""
    aid = "ckpt-trained"
    spec = LoraSpec(rank=4, seed=5, train_unembed=True)
    engine.create_adapter(aid, M, spec)
    rng = np.random.default_rng(3)
    batches = [[random_datum(rng, 10), random_datum(rng, 6)] for _ in range(4)]
    for data in batches[:3]:
        _train(engine, aid, data)
    directory = tmp_path_factory.mktemp("ckpt") / "state"
    written = engine.save_state(aid, directory, optimizer=True)
    saved = {k: (a.clone(), b.clone()) for k, (a, b) in engine.adapter_tensors(aid).items()}
    next_loss = _train(engine, aid, batches[3])
    after = {k: (a.clone(), b.clone()) for k, (a, b) in engine.adapter_tensors(aid).items()}
    return dict(id=aid, spec=spec, dir=directory, written=written, saved=saved, batch=batches[3],
                next_loss=next_loss, after=after)


def test_save_state_files(trained):
    directory = trained["dir"]
    files = sorted(os.listdir(directory))
    assert files == ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "tinkex_state.json"]
    assert trained["written"] == sum((directory / f).stat().st_size for f in files)
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 32.0, M)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj", "lm_head"}
    weights = load_file(directory / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in weights
    assert weights["base_model.model.lm_head.lora_B.weight"].shape == (2048, 4)
    state = json.loads((directory / "tinkex_state.json").read_text())
    assert state["base_model"] == M and state["spec"]["rank"] == 4 and state["kind"] == "state"
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no temp dirs


def test_resume_is_exact(engine, trained, new_id):
    aid = new_id()
    assert engine.load_state(aid, trained["dir"], optimizer=True) == (M, trained["spec"])
    loaded = engine.adapter_tensors(aid)
    assert all(torch.equal(loaded[k][0], a) and torch.equal(loaded[k][1], b) for k, (a, b) in trained["saved"].items())
    loss = _train(engine, aid, trained["batch"])
    assert loss == pytest.approx(trained["next_loss"], abs=1e-6)
    for k, (a, b) in trained["after"].items():
        torch.testing.assert_close(loaded[k][0], a, rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded[k][1], b, rtol=0, atol=1e-6)
    engine.remove_adapter(aid)


def test_load_without_optimizer_starts_fresh_moments(engine, trained, new_id):
    aid = new_id()
    engine.load_state(aid, trained["dir"], optimizer=False)
    _train(engine, aid, trained["batch"])
    # same weights and gradient, but a first Adam step instead of the fourth: a different update
    moved = engine.adapter_tensors(aid)["lm_head"][1]
    assert not torch.allclose(moved, trained["after"]["lm_head"][1], atol=1e-6)
    engine.remove_adapter(aid)


def test_peft_loads_our_checkpoint(engine, trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    directory = tmp_path / "sampler"
    written = engine.save_sampler_weights(trained["id"], directory)
    assert not (directory / "optimizer.safetensors").exists() and written > 0
    base = AutoModelForCausalLM.from_pretrained(engine._bases[M].directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft notes that lm_head is tied to the embedding
        model = PeftModel.from_pretrained(base, directory).eval()
    tokens = [1, 300, 201, 17, 23, 99, 2]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([tokens])).logits[0].log_softmax(-1).numpy()
    np.testing.assert_allclose(full_logprobs(engine, trained["id"], tokens), want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_we_load_a_peft_made_adapter(engine, tmp_path, new_id):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(engine._bases[M].directory)
    config = LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                        base_model_name_or_path=M, task_type="CAUSAL_LM")
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(tmp_path / "peft")
    aid = new_id()
    assert engine.load_sampler_weights(aid, tmp_path / "peft") == M
    assert {p.rsplit(".", 1)[-1] for p in engine.adapter_tensors(aid)} == {"q_proj", "v_proj", "down_proj"}
    tokens = [5, 6, 7, 300, 400]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([tokens])).logits[0].log_softmax(-1).numpy()
    np.testing.assert_allclose(full_logprobs(engine, aid, tokens), want, rtol=1e-5, atol=1e-5)
    engine.remove_adapter(aid)


def test_sampler_weights_are_inference_only(engine, trained, tmp_path, new_id):
    directory = tmp_path / "weights"
    engine.save_sampler_weights(trained["id"], directory)
    tokens = [1, 2, 3, 4, 5]
    for source in (directory, trained["dir"]):  # a sampler-weights dir or a save_state dir
        aid = new_id()
        assert engine.load_sampler_weights(aid, source) == M
        job = ForwardBackwardJob(aid, [random_datum(np.random.default_rng(0), 5)], "cross_entropy")
        (error,) = engine.forward_backward([job])
        assert isinstance(error, EngineError) and "sampling only" in str(error)
        with pytest.raises(EngineError, match="sampling only"):
            engine.optim_step(aid, HYPER)
        (res,) = engine.sample([SampleJob(M, aid, tokens, max_tokens=3, temperature=0.0)])
        assert len(res.sequences[0].tokens) >= 1
        engine.remove_adapter(aid)
    # weights saved after the 4th step equal the adapter now
    aid = new_id()
    engine.load_sampler_weights(aid, directory)
    np.testing.assert_array_equal(full_logprobs(engine, aid, tokens), full_logprobs(engine, trained["id"], tokens))
    engine.remove_adapter(aid)


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "adapter_model.safetensors").unlink(), "missing adapter_model.safetensors"),
    (lambda d: (d / "optimizer.safetensors").write_bytes((d / "optimizer.safetensors").read_bytes()[:-9]), "truncated"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:])((d / "adapter_model.safetensors").read_bytes())), "corrupt"),
    (lambda d: (d / "tinkex_state.json").write_text("{not json"), "tinkex_state.json"),
    (lambda d: (d / "tinkex_state.json").unlink(), "tinkex_state.json"),
])
def test_damaged_checkpoint_is_refused(engine, trained, tmp_path, new_id, damage, message):
    directory = _copy(trained["dir"], tmp_path / "copy")
    damage(directory)
    aid = new_id()
    with pytest.raises(EngineError, match=message) as info:
        engine.load_state(aid, directory, optimizer=True)
    assert str(directory) in str(info.value)
    assert not engine.has_adapter(aid)
    engine.load_state(aid, trained["dir"], optimizer=True)  # the engine is fine and the id is still free
    engine.remove_adapter(aid)


def test_load_errors(engine, trained, tmp_path, new_id):
    with pytest.raises(EngineError, match="no such directory"):
        engine.load_state(new_id(), tmp_path / "absent", optimizer=False)
    with pytest.raises(EngineError, match="already exists"):
        engine.load_state(trained["id"], trained["dir"], optimizer=False)
    weights = tmp_path / "weights"
    engine.save_sampler_weights(trained["id"], weights)
    with pytest.raises(EngineError, match="not a 'state'"):
        engine.load_state(new_id(), weights, optimizer=False)
    no_optimizer = tmp_path / "no-opt"
    engine.save_state(trained["id"], no_optimizer, optimizer=False)
    with pytest.raises(EngineError, match="without optimizer"):
        engine.load_state(new_id(), no_optimizer, optimizer=True)


def test_save_overwrites_atomically(engine, trained, tmp_path):
    directory = tmp_path / "again"
    engine.save_state(trained["id"], directory, optimizer=True)
    engine.save_state(trained["id"], directory, optimizer=False)
    assert not (directory / "optimizer.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_save_before_any_step_and_partial_targets(engine, tmp_path, new_id):
    spec = LoraSpec(rank=3, seed=21, train_attn=False)
    original, restored = new_id(), new_id()
    engine.create_adapter(original, M, spec)
    engine.save_state(original, tmp_path / "fresh", optimizer=True)
    assert engine.load_state(restored, tmp_path / "fresh", optimizer=True) == (M, spec)
    assert engine.adapter_tensors(restored).keys() == engine.adapter_tensors(original).keys()
    assert not any("self_attn" in path for path in engine.adapter_tensors(restored))
    data = [random_datum(np.random.default_rng(8), 9)]
    assert _train(engine, original, data, steps=3) == pytest.approx(_train(engine, restored, data, steps=3), abs=1e-6)
    for aid in (original, restored):
        engine.remove_adapter(aid)
