"""The engine end to end, through the official `tinker` SDK: RL that learns, four tenants training at
once on one base model, continuous batching, target prompt logprobs, the newer losses, and adapters
freed when their session ends.

The RL and sampler tests run against a real `tinkex serve` process; the tests that look inside the
engine (one copy of the base weights, cross-tenant batches, adapters freed) run the same server
in-process (EmbeddedServer) so that they can read its engine.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tinkex.server import EmbeddedServer

from ..conftest import ALICE, start_server

MODEL = "tinkex/tiny-qwen3"
KEYS = [f"tml-tenant{i}-key-0123456789" for i in range(4)]


@pytest.fixture(scope="module")
def serve(tmp_path_factory, hf_home):
    proc = start_server(tmp_path_factory.mktemp("engine-e2e"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def alice(serve):
    client = tinker.ServiceClient(base_url=serve.base_url, api_key=ALICE)
    yield client
    client.close("success")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, hf_home):
    before = torch.get_num_threads()
    server = EmbeddedServer(tmp_path_factory.mktemp("engine-e2e-embedded"),
                            api_keys={key: f"tenant{i}" for i, key in enumerate(KEYS)}, torch_threads=1).start()
    yield server
    server.stop()
    torch.set_num_threads(before)


def eventually(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- RL: sample groups, score them, train; the mean reward rises --------------------------------

TARGET_BELOW = 256  # reward: the fraction of sampled tokens whose id is below this (1/8 of the vocabulary)
GROUPS, GROUP_SIZE, REPLY_TOKENS, STEPS = 8, 8, 8, 24


def reward(tokens: list[int]) -> float:
    return float(np.mean(np.asarray(tokens) < TARGET_BELOW))


def rl_datums(prompt: list[int], sequences) -> tuple[list[types.Datum], list[float]]:
    """Group-centred advantages on the reply tokens; the sampler's logprobs for the ratio."""
    rewards = [reward(seq.tokens) for seq in sequences]
    mean = float(np.mean(rewards))
    data = []
    for seq, r in zip(sequences, rewards):
        tokens = prompt + list(seq.tokens)
        n = len(prompt) - 1  # positions before the reply predict prompt tokens: no advantage there
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": np.array(tokens[1:], np.int64),
                            "logprobs": np.array([0.0] * n + list(seq.logprobs), np.float32),
                            "advantages": np.array([0.0] * n + [r - mean] * len(seq.tokens), np.float32)}))
    return data, rewards


@pytest.mark.parametrize("loss_fn, epochs", [("importance_sampling", 1), ("ppo", 2)])
def test_rl_raises_the_mean_reward(alice, loss_fn, epochs):
    """PPO takes two optimizer steps per batch of samples, so its second pass is off-policy and clips."""
    training = alice.create_lora_training_client(base_model=MODEL, rank=8, seed=0).result()
    rng = np.random.default_rng(0)
    means, clip_fractions = [], []
    params = types.SamplingParams(max_tokens=REPLY_TOKENS, temperature=1.0, stop=[])
    for step in range(STEPS):
        sampler = training.save_weights_and_get_sampling_client().result()
        prompts = [rng.integers(3, 2048, 4).tolist() for _ in range(GROUPS)]
        futures = [sampler.sample(types.ModelInput.from_ints(p), num_samples=GROUP_SIZE,
                                  sampling_params=params.model_copy(update={"seed": step * 100 + i}))
                   for i, p in enumerate(prompts)]
        data, rewards = [], []
        for prompt, future in zip(prompts, futures):
            group_data, group_rewards = rl_datums(prompt, future.result().sequences)
            data += group_data
            rewards += group_rewards
        means.append(float(np.mean(rewards)))
        for _ in range(epochs):
            fb = training.forward_backward(data, loss_fn)
            step_future = training.optim_step(types.AdamParams(learning_rate=1e-2))
            metrics = fb.result().metrics
            step_future.result()
            clip_fractions.append(metrics.get("clip_fraction:mean", 0.0))
    start, end = np.mean(means[:3]), np.mean(means[-3:])
    assert start < 0.25, means  # about 1/8 from the random-init model
    assert end > start + 0.3, means
    if loss_fn == "ppo":
        assert max(clip_fractions) > 0, clip_fractions  # the off-policy passes were clipped


# --- four tenants at once on one base model -----------------------------------------------------

def tenant_run(base_url: str, key: str, rank: int, seed: int, start: threading.Barrier | None = None):
    """A short supervised run: the per-step losses and the final logprobs of the tenant's own data."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(3):
        tokens = rng.integers(3, 2048, 13)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                                loss_fn_inputs={"target_tokens": tokens[1:].astype(np.int64),
                                                "weights": np.ones(12, np.float32)}))
    client = tinker.ServiceClient(base_url=base_url, api_key=key)
    try:
        training = client.create_lora_training_client(base_model=MODEL, rank=rank, seed=seed).result()
        if start is not None:
            start.wait(timeout=60)
        losses = []
        for _ in range(8):
            fb = training.forward_backward(data, "cross_entropy")
            step = training.optim_step(types.AdamParams(learning_rate=5e-3))
            losses.append(fb.result().metrics["loss:sum"])
            step.result()
        final = training.forward(data, "cross_entropy").result()
        return losses, [out["logprobs"].to_numpy() for out in final.loss_fn_outputs], training.model_id
    finally:
        client.close("success").result()


def test_four_tenants_at_once_match_each_alone_on_one_copy_of_the_base(embedded):
    engine = embedded.runtime.engine
    ranks, seeds = [2, 4, 8, 16], [11, 12, 13, 14]
    alone = [tenant_run(embedded.base_url, KEYS[i], ranks[i], seeds[i]) for i in range(4)]
    base = engine._bases[MODEL]
    model, storages = base.model, {p.data_ptr() for p in base.model.parameters()}
    before = engine.stats()

    results: list = [None] * 4
    start = threading.Barrier(4)

    def run(i: int) -> None:
        results[i] = tenant_run(embedded.base_url, KEYS[i], ranks[i], seeds[i], start)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    after = engine.stats()

    for (losses, logprobs, _), (want_losses, want_logprobs, _) in zip(results, alone):
        # Equal up to float32 rounding of differently padded batches (on this CPU: bit for bit).
        np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
        for got, want in zip(logprobs, want_logprobs):
            np.testing.assert_allclose(got, want, atol=1e-4)
    assert all(r[0][-1] < r[0][0] for r in results)  # and they did learn
    # the tenants' work really was batched together...
    assert after["multi_adapter_batches"] > before["multi_adapter_batches"]
    # ...on the one copy of the base weights that existed before they came
    assert list(engine._bases) == [MODEL] and base.model is model
    assert {p.data_ptr() for p in base.model.parameters()} == storages
    assert after["base_models"][MODEL]["parameter_bytes"] == before["base_models"][MODEL]["parameter_bytes"]
    # and each session's adapters are freed now that its client closed
    assert eventually(lambda: engine.stats()["adapters"]["total"] == 0), engine.adapter_ids()


def test_finishing_a_session_frees_its_adapters(embedded):
    engine = embedded.runtime.engine
    other = tinker.ServiceClient(base_url=embedded.base_url, api_key=KEYS[1])
    keeper = other.create_lora_training_client(base_model=MODEL, rank=2).result()
    client = tinker.ServiceClient(base_url=embedded.base_url, api_key=KEYS[0])
    first = client.create_lora_training_client(base_model=MODEL, rank=4).result()
    client.create_lora_training_client(base_model=MODEL, rank=8).result()
    sampler = first.save_weights_and_get_sampling_client().result()
    sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=2)).result()
    assert engine.stats()["adapters"]["total"] == 4  # two runs, the sampler snapshot, the other tenant's run

    client.close("success").result()
    assert eventually(lambda: engine.stats()["adapters"]["total"] == 1)  # on the engine thread, at its next turn
    assert engine.adapter_ids() == [keeper.model_id]  # the other session keeps its own
    other.close("success").result()


# --- sampling -------------------------------------------------------------------------------

def test_a_short_request_joins_a_long_running_one(alice):
    """Continuous batching: a request that arrives while another decodes does not wait for it."""
    sampler = alice.create_sampling_client(base_model=MODEL).result()
    prompt = types.ModelInput.from_ints([1, 2, 3, 4])
    long = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=1500, seed=1, stop=[]))
    time.sleep(0.3)  # let it start decoding
    short_params = types.SamplingParams(max_tokens=4, seed=7, stop=[])
    short = sampler.sample(prompt, 2, short_params).result()
    assert not long.future().done(), "the short request waited for the long one"
    assert [len(s.tokens) for s in short.sequences] == [4, 4]
    assert len(long.result().sequences[0].tokens) == 1500
    again = sampler.sample(prompt, 2, short_params).result()  # alone this time: the same tokens
    assert [s.tokens for s in again.sequences] == [s.tokens for s in short.sequences]


@pytest.mark.parametrize("sparse", [False, True])
def test_target_prompt_logprobs(alice, sparse):
    sampler = alice.create_sampling_client(base_model=MODEL).result()
    prompt = [1, 388, 201, 761, 278, 223, 19, 20]
    targets = np.full((len(prompt) - 1, 6), -1, np.int64)  # mostly unused cells: the SDK sends it sparse
    targets[:, 0] = prompt[1:]  # the real next token: must equal the prompt logprob
    targets[2, 1:3] = [5, 6]
    targets[6, 5] = 2047
    tensor = (types.TensorData.from_torch_sparse(torch.from_numpy(targets), pad_value=-1) if sparse
              else types.TensorData.from_numpy(targets))
    assert (tensor.sparse_crow_indices is not None) == sparse
    response = sampler.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=1),
                              include_prompt_logprobs=True, target_prompt_logprobs=tensor).result()
    got = response.target_prompt_logprobs.to_numpy()
    assert got.shape == targets.shape and got.dtype == np.float32
    np.testing.assert_allclose(got[:, 0], response.prompt_logprobs[1:], atol=1e-6)
    assert (got[targets < 0] == 0.0).all() and (got[targets >= 0] < 0).all()
    with pytest.raises(tinker.BadRequestError, match="len\\(prompt\\) - 1"):
        sampler.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=1),
                       target_prompt_logprobs=types.TensorData.from_numpy(targets[1:])).result()


# --- the newer losses, and bad requests answered at once ---------------------------------------

def test_gspo_and_stable_reinforce_through_the_sdk(alice):
    training = alice.create_lora_training_client(base_model=MODEL, rank=4, seed=3).result()
    tokens = list(range(10, 22))
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
        "target_tokens": np.array(tokens[1:], np.int64),
        "logprobs": np.full(11, -7.5, np.float32),
        "advantages": np.linspace(-1, 1, 11).astype(np.float32),
        "sequence_ratio_mask": np.array([0] * 3 + [1] * 8, np.float32)})
    gspo = training.forward_backward([datum], "gspo", {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0})
    stable = training.forward_backward([datum], "stable_reinforce", {"kl_coeff": 0.01})
    for future in (gspo, stable):
        result = future.result()
        assert np.isfinite(result.metrics["loss:sum"]) and result.loss_fn_outputs[0]["logprobs"].shape == [11]
    assert "kl:mean" in stable.result().metrics and "clip_fraction:mean" in gspo.result().metrics


@pytest.mark.parametrize("loss_fn, inputs, message", [
    ("gspo", ("target_tokens", "logprobs"), "'advantages'"),
    ("stable_reinforce", ("target_tokens", "advantages"), "'logprobs'"),
    ("importance_sampling", ("target_tokens",), "'logprobs', 'advantages'"),
])
def test_a_missing_loss_input_is_a_400_that_names_it(alice, loss_fn, inputs, message):
    training = alice.create_lora_training_client(base_model=MODEL, rank=2).result()
    values = {"target_tokens": np.array([2, 3, 4], np.int64), "logprobs": np.zeros(3, np.float32),
              "advantages": np.ones(3, np.float32)}
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={k: values[k] for k in inputs})
    with pytest.raises(tinker.BadRequestError, match=message):
        training.forward_backward([datum], loss_fn).result()


def test_an_unknown_loss_is_a_400(serve):
    import httpx

    headers = {"X-API-Key": ALICE}
    api = f"{serve.base_url}/api/v1"
    session = httpx.post(f"{api}/create_session", json={"tags": [], "sdk_version": "0.38.0"}, headers=headers).json()
    created = httpx.post(f"{api}/create_model", headers=headers, json={
        "session_id": session["session_id"], "model_seq_id": 0, "base_model": MODEL, "lora_config": {"rank": 2}})
    model_id = created.json()["model_id"]
    for loss_fn, message in (("hinge", "unknown loss 'hinge'"), ("custom", "unsupported loss 'custom'")):
        response = httpx.post(f"{api}/forward_backward", headers=headers, json={
            "model_id": model_id, "seq_id": 1, "forward_backward_input": {"loss_fn": loss_fn, "data": [
                {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                 "loss_fn_inputs": {"target_tokens": {"data": [2, 3], "dtype": "int64", "shape": [2]}}}]}})
        assert response.status_code == 400 and message in response.json()["detail"], response.text
