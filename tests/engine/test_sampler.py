"""The sampler: KV-cached decoding that agrees with the trainer, seeds, stops, prompt logprobs."""

from __future__ import annotations

import numpy as np
import pytest

from tinkex.engine import EngineError, LoraSpec, SampleJob

from .conftest import M, V, full_logprobs, randomize_b

PROMPT = [1, 388, 201, 761, 278, 223, 19, 20, 13, 25, 33, 2, 201, 1, 420, 201]


@pytest.fixture(scope="module")
def adapters(engine):
    """Two adapters with non-zero B (so they change the model), of different ranks and targets."""
    ids = ["sampler-a", "sampler-b"]
    engine.create_adapter(ids[0], M, LoraSpec(rank=8, seed=1))
    engine.create_adapter(ids[1], M, LoraSpec(rank=2, seed=2, train_mlp=False))
    for i, aid in enumerate(ids):
        randomize_b(engine, aid, seed=10 + i, std=0.1)
    yield ids
    for aid in ids:
        engine.remove_adapter(aid)


def _one(engine, **kwargs):
    job = SampleJob(**{"base_model": M, "adapter_id": None, "prompt": PROMPT, **kwargs})
    (result,) = engine.sample([job])
    assert not isinstance(result, EngineError), result
    return result


def test_greedy_is_the_argmax_of_the_full_forward(engine, adapters):
    """Token by token through the KV cache, greedy picks what a full forward ranks first, and the
    reported logprobs are the forward's (unmodified distribution)."""
    for aid in adapters:
        seq = _one(engine, adapter_id=aid, max_tokens=12, temperature=0.0, stop_token_ids=[]).sequences[0]
        assert seq.tokens.dtype == np.int32 and seq.logprobs.dtype == np.float32 and len(seq.tokens) == 12
        full = full_logprobs(engine, aid, PROMPT + seq.tokens[:-1].tolist())[len(PROMPT) - 1:]
        np.testing.assert_array_equal(full.argmax(-1), seq.tokens)
        np.testing.assert_allclose(seq.logprobs, full[np.arange(12), seq.tokens], atol=1e-4)
        again = _one(engine, adapter_id=aid, max_tokens=12, temperature=0.0, stop_token_ids=[]).sequences[0]
        np.testing.assert_array_equal(again.tokens, seq.tokens)


def test_sampled_logprobs_agree_with_forward(engine, adapters):
    """At temperature != 1 and with top-k/top-p, the logprobs are still the raw distribution's."""
    for kwargs in (dict(), dict(temperature=0.7, top_k=50, top_p=0.9)):
        result = _one(engine, adapter_id=adapters[0], num_samples=3, max_tokens=10, seed=7, stop_token_ids=[], **kwargs)
        for seq in result.sequences:
            full = full_logprobs(engine, adapters[0], PROMPT + seq.tokens[:-1].tolist())[len(PROMPT) - 1:]
            assert np.abs(seq.logprobs - full[np.arange(len(seq.tokens)), seq.tokens]).max() < 1e-4


def test_seed_determinism(engine, adapters):
    kwargs = dict(adapter_id=adapters[0], num_samples=4, max_tokens=10, stop_token_ids=[])
    first = _one(engine, seed=123, **kwargs)
    second = _one(engine, seed=123, **kwargs)
    other = _one(engine, seed=124, **kwargs)
    tokens = lambda r: [s.tokens.tolist() for s in r.sequences]  # noqa: E731
    assert tokens(first) == tokens(second)
    assert tokens(first) != tokens(other)
    assert len({tuple(t) for t in tokens(first)}) > 1  # the samples of one request differ
    big = _one(engine, seed=2**64 - 1, **kwargs)  # any 64-bit seed
    assert tokens(big) == tokens(_one(engine, seed=2**64 - 1, **kwargs))


def test_top_k_one_is_greedy_and_top_p_restricts(engine, adapters):
    greedy = _one(engine, adapter_id=adapters[1], max_tokens=8, temperature=0.0, stop_token_ids=[])
    top1 = _one(engine, adapter_id=adapters[1], max_tokens=8, temperature=1.5, top_k=1, seed=3, stop_token_ids=[])
    tiny_p = _one(engine, adapter_id=adapters[1], max_tokens=8, top_p=1e-6, seed=4, stop_token_ids=[])
    np.testing.assert_array_equal(top1.sequences[0].tokens, greedy.sequences[0].tokens)
    np.testing.assert_array_equal(tiny_p.sequences[0].tokens, greedy.sequences[0].tokens)


def test_jobs_batched_together_equal_each_alone(engine, adapters):
    """Different prompt lengths (left padding), adapters and the bare base model in one call."""
    jobs = [
        SampleJob(M, adapters[0], PROMPT, num_samples=2, max_tokens=6, temperature=0.0, stop_token_ids=[]),
        SampleJob(M, None, [5, 6], num_samples=1, max_tokens=9, temperature=0.0, stop_token_ids=[]),
        SampleJob(M, adapters[1], PROMPT[:7], num_samples=3, max_tokens=4, seed=5, stop_token_ids=[],
                  prompt_logprobs=True),
        SampleJob(M, adapters[0], [7, 8, 9], num_samples=1, max_tokens=5, seed=6, stop_token_ids=[]),
    ]
    together = engine.sample(jobs)
    for job, res in zip(jobs, together):
        (alone,) = engine.sample([job])
        assert len(res.sequences) == job.num_samples
        for a, b in zip(res.sequences, alone.sequences):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        if job.prompt_logprobs:
            np.testing.assert_allclose(res.prompt_logprobs, alone.prompt_logprobs, atol=1e-5)


def test_stop_token_ids_and_eos(engine, adapters):
    free = _one(engine, adapter_id=adapters[0], max_tokens=12, temperature=0.0, stop_token_ids=[]).sequences[0]
    stop_token = int(free.tokens[5])
    first = free.tokens.tolist().index(stop_token)
    seq = _one(engine, adapter_id=adapters[0], max_tokens=12, temperature=0.0, stop_token_ids=[stop_token]).sequences[0]
    assert seq.tokens.tolist() == free.tokens[: first + 1].tolist() and seq.stop_reason == "stop"
    assert len(seq.logprobs) == len(seq.tokens)
    # the same token declared as EOS stops when stop_token_ids is None...
    base = engine._bases[M]
    saved = base.eos_ids
    base._eos_ids = frozenset({stop_token})
    try:
        eos = _one(engine, adapter_id=adapters[0], max_tokens=12, temperature=0.0).sequences[0]
        assert eos.tokens.tolist() == seq.tokens.tolist() and eos.stop_reason == "stop"
    finally:
        base._eos_ids = saved
    # ... and the real EOS set is the tokenizer's <|im_end|>
    assert saved == {engine.tokenizer(M).convert_tokens_to_ids("<|im_end|>")}
    assert free.stop_reason == "length"


def test_stop_strings(engine, adapters):
    tok = engine.tokenizer(M)
    free = _one(engine, adapter_id=adapters[0], max_tokens=12, temperature=0.0, stop_token_ids=[]).sequences[0]
    pieces = [tok.decode([t]) for t in free.tokens]
    stop = pieces[4] + pieces[5]  # spans two tokens
    text = tok.decode(free.tokens)
    end = text.index(stop) + len(stop)
    seq = _one(engine, adapter_id=adapters[0], max_tokens=12, temperature=0.0, stop_token_ids=[],
               stop_strings=[stop, "never appears \u2603"]).sequences[0]
    out = tok.decode(seq.tokens)
    assert seq.stop_reason == "stop"
    # it stops at the first token that completes the stop string, and keeps that token
    assert stop in out and len(out) >= end and stop not in tok.decode(seq.tokens[:-1])
    assert seq.tokens.tolist() == free.tokens[: len(seq.tokens)].tolist()


def test_prompt_logprobs(engine, adapters):
    aid = adapters[1]
    full = full_logprobs(engine, aid, PROMPT)
    expected = np.concatenate([[np.nan], full[np.arange(len(PROMPT) - 1), PROMPT[1:]]])
    result = _one(engine, adapter_id=aid, max_tokens=0, prompt_logprobs=True)  # compute_logprobs
    assert result.prompt_logprobs.dtype == np.float32 and result.prompt_logprobs.shape == (len(PROMPT),)
    assert np.isnan(result.prompt_logprobs[0])
    np.testing.assert_allclose(result.prompt_logprobs[1:], expected[1:], atol=1e-5)
    assert [len(s.tokens) for s in result.sequences] == [0]
    last = _one(engine, adapter_id=aid, max_tokens=2, prompt_logprobs=True, prompt_logprobs_last_n=3)
    assert np.isnan(last.prompt_logprobs[:-3]).all()
    np.testing.assert_allclose(last.prompt_logprobs[-3:], expected[-3:], atol=1e-5)
    longer = _one(engine, adapter_id=aid, max_tokens=1, prompt_logprobs=True, prompt_logprobs_last_n=10**6)
    assert np.isnan(longer.prompt_logprobs[0]) and not np.isnan(longer.prompt_logprobs[1:]).any()
    assert _one(engine, adapter_id=aid, max_tokens=1).prompt_logprobs is None


def test_topk_logprobs_and_sentinel(engine, adapters):
    aid = adapters[0]
    k = 4
    result = _one(engine, adapter_id=aid, max_tokens=5, temperature=0.0, stop_token_ids=[],
                  topk_prompt_logprobs=k, topk_sample_logprobs=3)
    ids, values = result.topk_prompt_token_ids, result.topk_prompt_logprobs
    assert ids.dtype == np.int32 and values.dtype == np.float32 and ids.shape == values.shape == (len(PROMPT), k)
    assert ids[0].tolist() == [0] * k and values[0].tolist() == [-99999.0] * k  # nothing predicts position 0
    full = full_logprobs(engine, aid, PROMPT)
    order = np.argsort(-full[:-1], axis=-1)[:, :k]
    np.testing.assert_array_equal(ids[1:], order)
    np.testing.assert_allclose(values[1:], np.take_along_axis(full[:-1], order, -1), atol=1e-5)
    seq = result.sequences[0]
    assert seq.topk_token_ids.shape == seq.topk_logprobs.shape == (5, 3)
    np.testing.assert_array_equal(seq.topk_token_ids[:, 0], seq.tokens)  # greedy: the top-1 was taken
    np.testing.assert_allclose(seq.topk_logprobs[:, 0], seq.logprobs, atol=1e-6)
    assert (np.diff(seq.topk_logprobs, axis=1) <= 0).all()
    last_n = _one(engine, adapter_id=aid, max_tokens=1, topk_prompt_logprobs=2, prompt_logprobs_last_n=2)
    assert (last_n.topk_prompt_logprobs[:-2] == -99999.0).all() and (last_n.topk_prompt_logprobs[-2:] > -99999.0).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=[]), "non-empty"),
    (dict(prompt=[1, V]), "outside the vocabulary"),
    (dict(prompt=[-1, 2]), "outside the vocabulary"),
    (dict(max_tokens=8192), "context"),
    (dict(num_samples=0), "num_samples"),
    (dict(num_samples=129), "num_samples"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(stop_token_ids=[V]), "stop token"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(adapter_id="missing"), "unknown adapter"),
    (dict(base_model="other/model"), "not served"),
])
def test_bad_sample_jobs_fail_alone(engine, adapters, kwargs, message):
    good = SampleJob(M, adapters[0], PROMPT, max_tokens=4, temperature=0.0, stop_token_ids=[])
    bad = SampleJob(**{"base_model": M, "adapter_id": None, "prompt": PROMPT, **kwargs})
    out_bad, out_good = engine.sample([bad, good])
    assert isinstance(out_bad, EngineError) and message in str(out_bad), out_bad
    (alone,) = engine.sample([good])
    np.testing.assert_array_equal(out_good.sequences[0].tokens, alone.sequences[0].tokens)
