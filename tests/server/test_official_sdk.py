"""The official `tinker` SDK (0.38.0), unchanged, against a real `tinkex serve` process."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tinker
from tinker import types

from ..conftest import ALICE, BOB

MODEL = "tinkex/tiny-qwen3"
# A small task the tiny random-init model can learn in a few dozen steps: what each animal says.
PAIRS = [("cat says", " meow"), ("dog says", " woof"), ("cow says", " moo"), ("duck says", " quack"),
         ("owl says", " hoot"), ("bee says", " buzz")]


def make_datum(tokenizer, prompt: str, completion: str) -> types.Datum:
    prompt_tokens = tokenizer.encode(prompt)
    completion_tokens = tokenizer.encode(completion) + [tokenizer.eos_token_id]
    tokens = prompt_tokens + completion_tokens
    weights = [0.0] * len(prompt_tokens) + [1.0] * len(completion_tokens)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                        "weights": np.array(weights[1:], dtype=np.float32)},
    )


def pairs_batch(tokenizer) -> list[types.Datum]:
    return [make_datum(tokenizer, prompt, reply) for prompt, reply in PAIRS]


def loss_per_token(result: types.ForwardBackwardOutput, batch: list[types.Datum]) -> float:
    return result.metrics["loss:sum"] / sum(float(d.loss_fn_inputs["weights"].to_numpy().sum()) for d in batch)


@pytest.fixture(scope="module")
def alice(server):
    client = tinker.ServiceClient(base_url=server.base_url, api_key=ALICE)
    yield client
    client.close("success")


@pytest.fixture(scope="module")
def trained(alice):
    """A 36-step supervised run, pipelined as the SDK intends: forward_backward and optim_step in flight together."""
    training = alice.create_lora_training_client(base_model=MODEL, rank=16, seed=1).result()
    tokenizer = training.get_tokenizer()
    batch = pairs_batch(tokenizer)
    adam = types.AdamParams(learning_rate=5e-3)
    losses = []
    for _ in range(36):
        fb = training.forward_backward(batch, "cross_entropy")
        step = training.optim_step(adam)
        losses.append(loss_per_token(fb.result(), batch))
        step.result()
    return training, tokenizer, batch, losses


def test_capabilities_list_the_builtin_model(alice):
    models = {m.model_name: m for m in alice.get_server_capabilities().supported_models}
    assert MODEL in models and models[MODEL].max_context_length > 0


def test_supervised_loss_falls_by_more_than_half(trained):
    _, _, _, losses = trained
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses


def test_the_run_keeps_its_metric_history(trained, server):
    import httpx

    training, _, batch, losses = trained
    history = httpx.get(f"{server.base_url}/api/v1/training_runs/{training.model_id}/metrics",
                        headers={"X-API-Key": ALICE}).json()["metrics"]
    steps = [h for h in history if h["request_type"] == "ForwardBackward"]
    optim = [h for h in history if h["request_type"] == "OptimStep"]
    assert len(steps) >= len(losses) and len(optim) >= len(losses)
    assert [s["seq_id"] for s in history] == sorted(s["seq_id"] for s in history)
    total_weight = sum(float(d.loss_fn_inputs["weights"].to_numpy().sum()) for d in batch)
    recorded = [s["metrics"]["loss:sum"] / total_weight for s in steps[: len(losses)]]
    assert recorded == pytest.approx(losses, rel=1e-6)  # the same numbers the SDK got back, in order
    assert httpx.get(f"{server.base_url}/api/v1/training_runs/{training.model_id}/metrics",
                     headers={"X-API-Key": BOB}).status_code == 404


def test_per_datum_logprobs_match_loss(trained):
    training, _, batch, _ = trained
    out = training.forward(batch, "cross_entropy").result()
    assert len(out.loss_fn_outputs) == len(batch)
    total = 0.0
    for datum, output in zip(batch, out.loss_fn_outputs):
        logprobs = output["logprobs"].to_numpy()
        assert logprobs.shape == datum.loss_fn_inputs["target_tokens"].to_numpy().shape
        assert (logprobs <= 0).all()
        total += float(-(logprobs * datum.loss_fn_inputs["weights"].to_numpy()).sum())
    assert out.metrics["loss:sum"] == pytest.approx(total, rel=1e-4)
    # forward changes nothing: the same call gives the same numbers
    again = training.forward(batch, "cross_entropy").result()
    assert again.metrics["loss:sum"] == pytest.approx(out.metrics["loss:sum"], rel=1e-6)


def test_negative_weights_are_accepted(trained):
    training, tokenizer, batch, _ = trained
    datum = batch[0]
    negative = types.Datum(model_input=datum.model_input, loss_fn_inputs={
        "target_tokens": datum.loss_fn_inputs["target_tokens"],
        "weights": -datum.loss_fn_inputs["weights"].to_numpy() * 0.5})
    plain = training.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    flipped = training.forward([negative], "cross_entropy").result().metrics["loss:sum"]
    assert flipped == pytest.approx(-0.5 * plain, rel=1e-4)


def test_sampling_shows_what_was_learned(trained, alice):
    training, tokenizer, _, _ = trained
    sampler = training.save_weights_and_get_sampling_client().result()
    for prompt, reply in PAIRS:
        result = sampler.sample(types.ModelInput.from_ints(tokenizer.encode(prompt)), num_samples=1,
                                sampling_params=types.SamplingParams(max_tokens=4, temperature=0.0)).result()
        text = tokenizer.decode(result.sequences[0].tokens, skip_special_tokens=True)
        assert text == reply, (prompt, text)
        assert result.sequences[0].stop_reason == "stop"  # it learned to end with EOS too
    base = alice.create_sampling_client(base_model=MODEL).result()
    prompt = types.ModelInput.from_ints(tokenizer.encode("cat says"))
    base_text = tokenizer.decode(base.sample(prompt, 1, types.SamplingParams(max_tokens=4, temperature=0.0))
                                 .result().sequences[0].tokens, skip_special_tokens=True)
    assert base_text != " meow"


def test_sampling_parameters(trained):
    training, tokenizer, _, _ = trained
    path = training.save_weights_for_sampler("sampler-params").result().path
    assert path.endswith("/sampler_weights/sampler-params") and path.startswith("tinker://")
    sampler = training.create_sampling_client(path).result()
    prompt = types.ModelInput.from_ints(tokenizer.encode("The cat"))
    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=12345, stop=[])
    first = sampler.sample(prompt, num_samples=3, sampling_params=params).result()
    again = sampler.sample(prompt, num_samples=3, sampling_params=params).result()
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert len(first.sequences) == 3
    for seq in first.sequences:
        assert len(seq.tokens) == 12 and seq.stop_reason == "length"
        assert len(seq.logprobs) == 12 and all(lp <= 0 for lp in seq.logprobs)
        assert seq.sequence_id  # stamped from the asample answer's sample_sequence_ids
    greedy = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    a = sampler.sample(prompt, 2, greedy).result()
    assert a.sequences[0].tokens == a.sequences[1].tokens
    # top_k=1 is greedy too, whatever the temperature
    top1 = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=7, stop=[]))
    assert top1.result().sequences[0].tokens == a.sequences[0].tokens
    # a stop token id: generation ends with it
    stop_id = a.sequences[0].tokens[2]
    stopped = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=8, temperature=0.0, stop=[stop_id])).result()
    assert stopped.sequences[0].stop_reason == "stop" and stopped.sequences[0].tokens[-1] == stop_id
    assert len(stopped.sequences[0].tokens) <= 3
    # a stop string: the text ends with it
    text = tokenizer.decode(a.sequences[0].tokens)
    stop_text = text[len(text) // 2:][:2]
    if stop_text.strip():
        s = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=8, temperature=0.0, stop=[stop_text])).result()
        assert s.sequences[0].stop_reason == "stop"
        assert stop_text in tokenizer.decode(s.sequences[0].tokens)


def test_prompt_logprobs(trained):
    training, tokenizer, batch, _ = trained
    sampler = training.save_weights_and_get_sampling_client().result()
    tokens = tokenizer.encode("dog says woof")
    logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert len(logprobs) == len(tokens) and logprobs[0] is None
    assert all(lp is not None and lp <= 0 for lp in logprobs[1:])
    # they agree with the trainer's forward pass on the same weights
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                                        "weights": np.ones(len(tokens) - 1, dtype=np.float32)})
    trainer = training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(np.array(logprobs[1:]), trainer, atol=1e-4)
    res = sampler.sample(types.ModelInput.from_ints(tokens), 1, types.SamplingParams(max_tokens=1),
                         include_prompt_logprobs=True, topk_prompt_logprobs=3).result()
    assert res.prompt_logprobs[0] is None
    assert res.topk_prompt_logprobs[0] is None and len(res.topk_prompt_logprobs[1]) == 3


def test_resume_from_state_matches_never_stopping(alice):
    training = alice.create_lora_training_client(base_model=MODEL, rank=8, seed=3).result()
    tokenizer = training.get_tokenizer()
    batch = pairs_batch(tokenizer)
    adam = types.AdamParams(learning_rate=5e-3, weight_decay=0.01, grad_clip_norm=1.0)
    for _ in range(3):
        training.forward_backward(batch, "cross_entropy")
        training.optim_step(adam).result()
    path = training.save_state("resume-point").result().path
    assert path.endswith("/weights/resume-point")

    def two_more_steps(client) -> list[float]:
        losses = []
        for _ in range(2):
            losses.append(client.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"])
            client.optim_step(adam).result()
        return losses

    expected = two_more_steps(training)
    resumed = alice.create_training_client_from_state_with_optimizer(path).result()
    assert two_more_steps(resumed) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # weights only: the first loss matches, the optimizer starts fresh so the second differs
    fresh = alice.create_training_client_from_state(path).result()
    weights_only = two_more_steps(fresh)
    assert weights_only[0] == pytest.approx(expected[0], rel=1e-5)
    assert weights_only[1] != pytest.approx(expected[1], rel=1e-6)


def test_lora_config_is_honoured(alice):
    training = alice.create_lora_training_client(base_model=MODEL, rank=4, seed=0, train_mlp=False,
                                                 train_attn=True, train_unembed=False).result()
    info = training.get_info()
    assert info.lora_rank == 4 and info.model_data.model_name == MODEL
    path = training.save_state("lora-config").result().path
    rest = alice.create_rest_client()
    weights = rest.get_weights_info_by_tinker_path(path).result()
    assert (weights.lora_rank, weights.train_mlp, weights.train_attn, weights.train_unembed) == (4, False, True, False)
    # the same seed gives the same initial adapter, hence the same outputs
    twin = alice.create_lora_training_client(base_model=MODEL, rank=4, seed=0, train_mlp=False,
                                             train_attn=True, train_unembed=False).result()
    datum = pairs_batch(training.get_tokenizer())[:2]
    adam = types.AdamParams(learning_rate=1e-2)
    for client in (training, twin):
        client.forward_backward(datum, "cross_entropy")
        client.optim_step(adam).result()
    a = training.forward(datum, "cross_entropy").result().metrics["loss:sum"]
    b = twin.forward(datum, "cross_entropy").result().metrics["loss:sum"]
    assert a == pytest.approx(b, rel=1e-6)


def test_rest_listings_and_tenant_isolation(trained, alice, server):
    training, _, _, _ = trained
    state = training.save_state("listed").result().path
    rest = alice.create_rest_client()
    run = rest.get_training_run_by_tinker_path(state).result()
    assert run.training_run_id == training.model_id and run.base_model == MODEL and run.lora_rank == 16
    assert run.last_checkpoint is not None
    runs = rest.list_training_runs(limit=100).result()
    assert training.model_id in {r.training_run_id for r in runs.training_runs}
    checkpoints = rest.list_checkpoints(training.model_id).result().checkpoints
    by_path = {c.tinker_path: c for c in checkpoints}
    assert state in by_path and by_path[state].checkpoint_type == "training"
    assert by_path[state].checkpoint_id == "weights/listed" and by_path[state].size_bytes > 0
    assert state in {c.tinker_path for c in rest.list_user_checkpoints(limit=200).result().checkpoints}
    sessions = rest.list_sessions(limit=50).result().sessions
    session_id = training.model_id.split(":train:")[0]
    assert session_id in sessions
    assert training.model_id in rest.get_session(session_id).result().training_run_ids

    bob = tinker.ServiceClient(base_url=server.base_url, api_key=BOB)
    bob_rest = bob.create_rest_client()
    with pytest.raises(Exception) as info:
        bob_rest.list_checkpoints(training.model_id).result()
    assert "404" in str(info.value) or isinstance(info.value, tinker.NotFoundError)
    with pytest.raises(Exception):
        bob_rest.get_training_run_by_tinker_path(state).result()
    with pytest.raises(Exception):
        bob.create_training_client_from_state(state).result()
    assert state not in {c.tinker_path for c in bob_rest.list_user_checkpoints().result().checkpoints}
    assert session_id not in bob_rest.list_sessions().result().sessions
    bob.close("success")

    rest.delete_checkpoint_from_tinker_path(state).result()
    assert state not in {c.tinker_path for c in rest.list_checkpoints(training.model_id).result().checkpoints}


def test_bad_input_fails_fast_and_the_server_keeps_serving(alice, trained):
    training, tokenizer, batch, _ = trained
    with pytest.raises(Exception) as info:
        alice.create_lora_training_client(base_model="no/such-model", rank=4).result()
    assert "no/such-model" in str(info.value)
    vocab = len(tokenizer)
    bad_ids = types.Datum(model_input=types.ModelInput.from_ints([1, vocab + 5]),
                          loss_fn_inputs={"target_tokens": np.array([2, 3]), "weights": np.ones(2, np.float32)})
    with pytest.raises(Exception) as info:
        training.forward_backward([bad_ids], "cross_entropy").result()
    assert "vocabulary" in str(info.value)
    with pytest.raises(Exception) as info:
        training.forward_backward(batch, "no_such_loss").result()
    assert "no_such_loss" in str(info.value)
    short = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={"target_tokens": np.array([2, 3]), "weights": np.ones(2, np.float32)})
    with pytest.raises(Exception) as info:
        training.forward_backward([short], "cross_entropy").result()
    assert "shape" in str(info.value)
    # and the same client still trains
    assert math.isfinite(training.forward(batch, "cross_entropy").result().metrics["loss:sum"])


def test_weights_users_can_take_away(trained, alice, server, tmp_path):
    """Export in Hugging Face PEFT format, download over signed links, and get the same numbers from peft."""
    import io
    import tarfile

    import httpx
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    training, tokenizer, _, _ = trained
    exported = training.save_weights_external("export").result()
    assert exported.path.endswith("/external_weights/export")
    rest = alice.create_rest_client()
    urls = rest.get_external_weights_urls(exported.path).result().urls
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(urls)
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    for name, url in urls.items():  # signed links need no API key
        response = httpx.get(url)
        assert response.status_code == 200
        (adapter_dir / name).write_bytes(response.content)
    assert httpx.get(next(iter(urls.values())) + "x").status_code == 403  # tampered links are refused

    tokens = tokenizer.encode("owl says hoot")
    base = AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    peft_logprobs = torch.log_softmax(logits, -1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
    sampler = training.save_weights_and_get_sampling_client().result()
    ours = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:]
    np.testing.assert_allclose(np.array(ours), peft_logprobs.numpy(), atol=1e-4)

    # a training checkpoint as one archive (what SDK 0.23's archive call and `tinkex checkpoint download` use)
    state = training.save_state("archived").result().path
    run_id, checkpoint_id = state[len("tinker://"):].split("/", 1)
    archive = httpx.get(f"{server.base_url}/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/archive",
                        headers={"X-API-Key": ALICE}, follow_redirects=True)
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        names = set(tar.getnames())
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors"} <= names
    assert httpx.get(f"{server.base_url}/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/archive",
                     headers={"X-API-Key": BOB}).status_code == 404


def test_checkpoint_ttl_and_publishing(trained, alice, server):
    training, _, _, _ = trained
    path = training.save_state("shared").result().path
    rest = alice.create_rest_client()
    rest.set_checkpoint_ttl_from_tinker_path(path, 7200).result()
    listed = {c.tinker_path: c for c in rest.list_checkpoints(training.model_id).result().checkpoints}
    assert listed[path].expires_at is not None
    rest.publish_checkpoint_from_tinker_path(path).result()
    assert {c.tinker_path: c for c in rest.list_checkpoints(training.model_id).result().checkpoints}[path].public
    # a published checkpoint can be loaded by another tenant
    bob = tinker.ServiceClient(base_url=server.base_url, api_key=BOB)
    copy = bob.create_training_client_from_state(path).result()
    assert copy.get_info().model_data.model_name == MODEL
    rest.unpublish_checkpoint_from_tinker_path(path).result()
    with pytest.raises(Exception):
        bob.create_training_client_from_state(path).result()
    bob.close("success")
    with pytest.raises(Exception):
        rest.set_checkpoint_ttl_from_tinker_path(path, 5).result()  # below the one-hour minimum
