"""SamplingClient against real tinkex servers: parameters, logprobs, concurrency, pickling, backpressure."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import pickle

import numpy as np
import pytest

import tinkex
from tinkex import types

from ..conftest import ALICE
from .conftest import MODEL, inject_fault


@pytest.fixture(scope="module")
def prompt(tokenizer) -> types.ModelInput:
    return types.ModelInput.from_ints(tokenizer.encode("Once upon a time, in a small village,"))


def test_sample_basic_and_sequence_ids(base_sampler, prompt):
    response = base_sampler.sample(prompt, 3, types.SamplingParams(max_tokens=6, seed=1)).result(60)
    assert len(response.sequences) == 3
    for sequence in response.sequences:
        assert 1 <= len(sequence.tokens) <= 6
        assert sequence.stop_reason in ("length", "stop")
        assert len(sequence.logprobs) == len(sequence.tokens)
        assert all(lp <= 0 for lp in sequence.logprobs)
        assert sequence.tokens_np.dtype == np.int32
    ids = [s.sequence_id for s in response.sequences]
    assert all(ids) and len(set(ids)) == 3
    assert response.prompt_logprobs is None


def test_seed_temperature_top_k_and_top_p(base_sampler, prompt):
    def tokens(**params):
        return base_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=8, **params)).result(60) \
            .sequences[0].tokens

    assert tokens(seed=5) == tokens(seed=5)
    assert len({tuple(tokens(seed=s)) for s in range(4)}) > 1
    greedy = tokens(temperature=0.0)
    assert tokens(temperature=0.0, seed=9) == greedy
    assert tokens(top_k=1, seed=3) == greedy
    assert tokens(top_p=1e-6, seed=4) == greedy
    # A seed of any 64-bit value is accepted.
    assert len(tokens(seed=2**64 - 1)) == 8


def test_max_tokens_and_stop_sequences(base_sampler, prompt, tokenizer):
    greedy = base_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])) \
        .result(60).sequences[0]
    assert len(greedy.tokens) == 8 and greedy.stop_reason == "length"
    stop_token = greedy.tokens[3]
    first = greedy.tokens.index(stop_token)
    by_token = base_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=8, temperature=0.0,
                                                                   stop=[stop_token])).result(60).sequences[0]
    assert by_token.stop_reason == "stop" and by_token.tokens == greedy.tokens[:first + 1]
    text = tokenizer.decode(greedy.tokens[first:first + 1])
    if text.strip():
        by_string = base_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=8, temperature=0.0,
                                                                        stop=text)).result(60).sequences[0]
        assert by_string.stop_reason == "stop"
        assert text in tokenizer.decode(by_string.tokens)
        assert len(by_string.tokens) <= first + 1


def test_prompt_logprobs_and_top_k(base_sampler, prompt):
    response = base_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2, seed=0),
                                   include_prompt_logprobs=True, topk_prompt_logprobs=3,
                                   topk_sample_logprobs=2).result(60)
    logprobs = response.prompt_logprobs
    assert len(logprobs) == prompt.length and logprobs[0] is None
    assert all(lp is not None and lp <= 0 for lp in logprobs[1:])
    assert np.isnan(response.prompt_logprobs_np[0])
    topk = response.topk_prompt_logprobs
    assert len(topk) == prompt.length and topk[0] is None
    for row, actual in zip(topk[1:], logprobs[1:]):
        assert len(row) == 3
        values = [lp for _, lp in row]
        assert values == sorted(values, reverse=True) and actual <= values[0] + 1e-4
    sampled = response.sequences[0]
    assert len(sampled.topk_logprobs) == len(sampled.tokens)
    assert all(len(row) == 2 for row in sampled.topk_logprobs)
    assert response.topk_prompt_logprobs_np.token_ids.shape == (prompt.length, 3)


def test_compute_logprobs_matches_prompt_logprobs(base_sampler, prompt):
    computed = base_sampler.compute_logprobs(prompt).result(60)
    sampled = base_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=1),
                                  include_prompt_logprobs=True).result(60).prompt_logprobs
    assert computed[0] is None and len(computed) == prompt.length
    np.testing.assert_allclose(computed[1:], sampled[1:], atol=1e-4)
    last = base_sampler.compute_logprobs(prompt, prompt_logprobs_last_n=3).result(60)
    assert all(x is None or math.isnan(x) for x in last[:-3])
    np.testing.assert_allclose(last[-3:], computed[-3:], atol=1e-4)
    with pytest.raises(ValueError):
        base_sampler.sample(prompt, 1, types.SamplingParams(), prompt_logprobs_last_n=2)


def test_32_samples_under_asyncio_gather(base_sampler, prompt):
    async def main():
        futures = [base_sampler.sample_async(prompt, 1, types.SamplingParams(max_tokens=4, seed=i))
                   for i in range(32)]
        return await asyncio.gather(*futures)

    responses = asyncio.run(main())
    assert len(responses) == 32 and all(len(r.sequences[0].tokens) >= 1 for r in responses)
    seeded = base_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4, seed=7)).result(60)
    assert responses[7].sequences[0].tokens == seeded.sequences[0].tokens
    assert len({tuple(r.sequences[0].tokens) for r in responses}) > 1


def _sample_in_child(sampler, prompt_tokens, queue):
    response = sampler.sample(types.ModelInput.from_ints(prompt_tokens), 1,
                              types.SamplingParams(max_tokens=5, seed=11)).result(120)
    queue.put((response.sequences[0].tokens, response.sequences[0].sequence_id))


def test_pickled_sampling_client_samples_in_a_spawned_process(base_sampler, prompt):
    copy = pickle.loads(pickle.dumps(base_sampler))
    assert copy.get_base_model() == MODEL and copy.sampling_session_id == base_sampler.sampling_session_id
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_sample_in_child, args=(base_sampler, prompt.to_ints(), queue))
    child.start()
    tokens, sequence_id = queue.get(timeout=120)
    child.join(60)
    assert child.exitcode == 0
    here = base_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=5, seed=11)).result(60)
    assert tokens == here.sequences[0].tokens
    # The child used its own seq_id range of the same sampling session.
    assert sequence_id != here.sequences[0].sequence_id


def _sample_in_forked_child(base_url, prompt_tokens, queue):
    sampler = tinkex.ServiceClient(base_url=base_url, api_key=ALICE).create_sampling_client(base_model=MODEL)
    response = sampler.sample(types.ModelInput.from_ints(prompt_tokens), 1,
                              types.SamplingParams(max_tokens=5, seed=11)).result(60)
    queue.put(response.sequences[0].tokens)


def test_a_forked_process_samples_after_its_parent_did(server, base_sampler, prompt):
    """The sampling pool's pyqwest runs its I/O on threads a fork does not copy: a child forked after
    the parent sampled must fall back to httpx, not wait forever."""
    here = base_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=5, seed=11)).result(60)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_sample_in_forked_child, args=(server.base_url, prompt.to_ints(), queue))
    child.start()
    try:
        assert queue.get(timeout=60) == here.sequences[0].tokens
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


def test_sampler_handle_round_trip(base_sampler, prompt):
    handle = base_sampler.get_sampler_handle()
    assert ALICE not in handle
    clone = tinkex.SamplingClient.from_sampler_handle(handle, api_key=ALICE)
    response = clone.sample(prompt, 1, types.SamplingParams(max_tokens=3, seed=2)).result(60)
    assert response.sequences[0].tokens == \
        base_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=3, seed=2)).result(60).sequences[0].tokens


@pytest.mark.parametrize("status", [429, 503])
def test_server_backpressure_and_unavailability_are_recovered(fault_server, status):
    client = tinkex.ServiceClient(base_url=fault_server.base_url, api_key=ALICE)
    sampler = client.create_sampling_client(base_model=MODEL).result(60)
    prompt = types.ModelInput.from_ints([1, 2, 3, 4])
    expected = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=3, seed=1)).result(60)
    inject_fault(fault_server, "/api/v1/asample", status, 2)
    response = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=3, seed=1)).result(60)
    assert response.sequences[0].tokens == expected.sequences[0].tokens
    client.close().result(30)


def test_503_while_polling_is_recovered(fault_server):
    client = tinkex.ServiceClient(base_url=fault_server.base_url, api_key=ALICE)
    sampler = client.create_sampling_client(base_model=MODEL).result(60)
    inject_fault(fault_server, "/api/v1/retrieve_future", 503, 3)
    response = sampler.sample(types.ModelInput.from_ints([5, 6, 7]), 2, types.SamplingParams(max_tokens=2)).result(60)
    assert len(response.sequences) == 2
    client.close().result(30)


def test_sampling_client_tokenizer(base_sampler):
    tokenizer = base_sampler.get_tokenizer()
    assert tokenizer.decode(tokenizer.encode("abc def")) == "abc def"
