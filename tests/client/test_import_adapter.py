"""Multipart upload against a real server: a PEFT adapter exported, downloaded and imported back samples
exactly like the original; bad uploads answer 400 and another tenant cannot see the import."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

import tinkex
from tinkex import types

from ..conftest import ALICE, BOB


def test_an_exported_adapter_imports_back_and_samples_the_same(server, tmp_path):
    service = tinkex.ServiceClient(base_url=server.base_url, api_key=ALICE)
    trainer = service.create_lora_training_client(base_model="tinkex/tiny-qwen3", rank=8, seed=2).result()
    tokenizer = trainer.get_tokenizer()
    tokens = tokenizer.encode("owl says hoot") + [tokenizer.eos_token_id]
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": np.array(tokens[1:]),
                                        "weights": np.ones(len(tokens) - 1, np.float32)})
    for _ in range(5):
        trainer.forward_backward([datum], "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    exported = trainer.save_weights_external("to-import").result().path
    rest = tinkex.RestClient(base_url=server.base_url, api_key=ALICE)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name, url in rest.get_external_weights_urls(exported).result().urls.items():
        (adapter / name).write_bytes(httpx.get(url).content)

    imported = rest.import_adapter(adapter, "tinkex/tiny-qwen3", "brought-in").result()
    assert imported.startswith("tinker://") and imported.endswith("/sampler_weights/brought-in")
    prompt = types.ModelInput.from_ints(tokens)
    original = trainer.save_weights_and_get_sampling_client().result().compute_logprobs(prompt).result()
    again = service.create_sampling_client(model_path=imported).result().compute_logprobs(prompt).result()
    np.testing.assert_allclose(np.array(again[1:]), np.array(original[1:]), atol=1e-5)

    bob = tinkex.RestClient(base_url=server.base_url, api_key=BOB)
    assert imported not in {c.tinker_path for c in bob.list_user_checkpoints().result().checkpoints}
    (adapter / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(tinkex.BadRequestError, match="PEFT"):
        rest.import_adapter(adapter, "tinkex/tiny-qwen3", "broken").result()
    service.close()
