"""Other base models: a local directory and a name in the HF cache, served beside the built-in one."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tinkex.engine import AdamHyper, Engine, EngineError, ForwardBackwardJob, LoraSpec, SampleJob, builtin

from .conftest import M, random_datum


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama (untied lm_head, another architecture) with the built-in tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(directory)
    for name in builtin.TOKENIZER_FILES:
        shutil.copyfile(builtin.ASSET_DIR / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def multi(llama_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("multi-hf-home")
    snapshot = home / "hub" / "models--acme--tiny-llama" / "snapshots" / ("ab" * 20)
    shutil.copytree(llama_dir, snapshot)
    (home / "hub" / "models--acme--tiny-llama" / "refs").mkdir()
    (home / "hub" / "models--acme--tiny-llama" / "refs" / "main").write_text("ab" * 20)
    return Engine([M, str(llama_dir), "acme/tiny-llama"], hf_home=home)


def test_infos_without_loading(multi, llama_dir):
    infos = multi.model_infos()
    assert [i.name for i in infos] == [M, str(llama_dir), "acme/tiny-llama"]
    assert [i.arch for i in infos] == ["Qwen3ForCausalLM", "LlamaForCausalLM", "LlamaForCausalLM"]
    assert infos[2].max_context_length == 512 and infos[2].tokenizer_id == "acme/tiny-llama"
    assert all(base._model is None for base in multi._bases.values())  # nothing loaded yet


def test_train_and_sample_on_each(multi, llama_dir):
    rng = np.random.default_rng(0)
    data = [random_datum(rng, 12), random_datum(rng, 7)]
    names = [M, str(llama_dir), "acme/tiny-llama"]
    for i, name in enumerate(names):
        multi.create_adapter(f"m{i}", name, LoraSpec(rank=4, seed=i))
    first = multi.forward_backward([ForwardBackwardJob(f"m{i}", data, "cross_entropy") for i in range(3)])
    for _ in range(10):
        for i in range(3):
            multi.optim_step(f"m{i}", AdamHyper(learning_rate=1e-2))
        last = multi.forward_backward([ForwardBackwardJob(f"m{i}", data, "cross_entropy") for i in range(3)])
    for before, after in zip(first, last):
        assert after.metrics["loss:sum"] < before.metrics["loss:sum"]
    # an untied lm_head is adapted too
    assert "lm_head" in multi.adapter_tensors("m1")
    results = multi.sample([SampleJob(name, f"m{i}", [1, 2, 3], max_tokens=4, seed=1, stop_token_ids=[])
                            for i, name in enumerate(names)])
    assert all(len(r.sequences[0].tokens) == 4 for r in results)
    (wrong,) = multi.sample([SampleJob(M, "m1", [1, 2, 3], max_tokens=2)])
    assert isinstance(wrong, EngineError) and "belongs to base model" in str(wrong)


def test_unknown_base_model_fails_at_start(tmp_path):
    with pytest.raises(EngineError, match="neither a local directory nor in the Hugging Face cache"):
        Engine(["acme/does-not-exist"], hf_home=tmp_path)
