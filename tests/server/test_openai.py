"""The OpenAI-compatible endpoint, driven by the official `openai` client."""

from __future__ import annotations

import numpy as np
import openai
import pytest
import tinker
from tinker import types

from ..conftest import ALICE, BOB

MODEL = "tinkex/tiny-qwen3"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=ALICE, max_retries=0)


@pytest.fixture(scope="module")
def trained_path(server):
    """A sampler checkpoint that has learned to answer "cat says" with " meow"."""
    service = tinker.ServiceClient(base_url=server.base_url, api_key=ALICE)
    trainer = service.create_lora_training_client(base_model=MODEL, rank=16, seed=1).result()
    tokenizer = trainer.get_tokenizer()
    tokens = tokenizer.encode("cat says meow") + [tokenizer.eos_token_id]
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": np.array(tokens[1:]),
                                        "weights": np.ones(len(tokens) - 1, np.float32)})
    for _ in range(30):
        trainer.forward_backward([datum], "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=5e-3)).result()
    path = trainer.save_weights_for_sampler("openai").result().path
    service.close("success")
    return path


def test_models_lists_base_models_and_sampler_checkpoints(client, trained_path):
    ids = {m.id for m in client.models.list().data}
    assert MODEL in ids and trained_path in ids


def test_completions_from_a_checkpoint(client, trained_path):
    completion = client.completions.create(model=trained_path, prompt="cat says", max_tokens=4, temperature=0)
    assert completion.choices[0].text == " meow"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens >= 1
    base = client.completions.create(model=MODEL, prompt="cat says", max_tokens=4, temperature=0)
    assert base.choices[0].text != " meow"
    several = client.completions.create(model=MODEL, prompt="The", max_tokens=5, temperature=1.0, n=3, seed=4)
    assert len(several.choices) == 3


def test_chat_completions_and_streaming(client, trained_path):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=6, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    streamed = client.completions.create(model=trained_path, prompt="cat says", max_tokens=4, temperature=0,
                                         stream=True)
    chunks = [c.choices[0].text for c in streamed]
    assert "".join(chunks) == " meow"
    assert len([c for c in chunks if c]) >= 2  # it arrived in pieces, as the tokens were decoded


def test_auth_and_errors(server, trained_path):
    bob = openai.OpenAI(base_url=server.base_url + "/v1", api_key=BOB, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        bob.completions.create(model=trained_path, prompt="cat says", max_tokens=2)
    stranger = openai.OpenAI(base_url=server.base_url + "/v1", api_key="tml-nobody-at-all", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    alice = openai.OpenAI(base_url=server.base_url + "/v1", api_key=ALICE, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        alice.completions.create(model="no/such-model", prompt="x", max_tokens=2)
