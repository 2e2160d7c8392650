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


@pytest.fixture(params=["dense", "rows"])
def cache_kind(request, monkeypatch):
    """Run a test with both caches: the lean decoder's DenseCache (what the built-in model gets) and
    the Hugging Face forward's RowCache (what models without a lean decoder get)."""
    if request.param == "rows":
        from tinkex.engine import decode

        monkeypatch.setattr(decode, "for_model", lambda base: None)
    return request.param


def _one(engine, **kwargs):
    job = SampleJob(**{"base_model": M, "adapter_id": None, "prompt": PROMPT, **kwargs})
    (result,) = engine.sample([job])
    assert not isinstance(result, EngineError), result
    return result


def test_greedy_is_the_argmax_of_the_full_forward(engine, adapters, cache_kind):
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


def test_jobs_batched_together_equal_each_alone(engine, adapters, cache_kind):
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


def test_target_prompt_logprobs(engine, adapters):
    """Row i asks for logprobs of chosen tokens as prompt token i + 1; -1 cells come back as 0.0."""
    aid = adapters[0]
    full = full_logprobs(engine, aid, PROMPT)  # full[i] predicts prompt token i + 1
    targets = np.full((len(PROMPT) - 1, 3), -1, np.int64)
    targets[2] = [PROMPT[3], 7, V - 1]
    targets[5, 1] = 0
    targets[-1] = [PROMPT[-1], -1, 11]
    result = _one(engine, adapter_id=aid, max_tokens=3, seed=1, target_prompt_tokens=targets)
    got = result.target_prompt_logprobs
    assert got.dtype == np.float32 and got.shape == targets.shape
    want = np.where(targets >= 0, np.take_along_axis(full[:-1], np.maximum(targets, 0), 1), 0.0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (got[targets < 0] == 0.0).all() and (got[targets >= 0] < 0).all()
    # together with prompt logprobs of the last few positions only, both are right
    both = _one(engine, adapter_id=aid, max_tokens=0, prompt_logprobs=True, prompt_logprobs_last_n=2,
                target_prompt_tokens=targets)
    np.testing.assert_allclose(both.target_prompt_logprobs, want, atol=1e-5)
    assert np.isnan(both.prompt_logprobs[:-2]).all()
    np.testing.assert_allclose(both.prompt_logprobs[-2:], full[np.arange(len(PROMPT) - 3, len(PROMPT) - 1),
                                                               PROMPT[-2:]], atol=1e-5)
    (bad,) = engine.sample([SampleJob(M, aid, PROMPT, target_prompt_tokens=targets[:-1])])
    assert isinstance(bad, EngineError) and "len(prompt) - 1" in str(bad)
    (bad,) = engine.sample([SampleJob(M, aid, PROMPT, target_prompt_tokens=np.full_like(targets, V))])
    assert isinstance(bad, EngineError) and "outside the vocabulary" in str(bad)


def _tokens(result):
    return [s.tokens.tolist() for s in result.sequences]


def _same(a, b):
    assert _tokens(a) == _tokens(b)
    for x, y in zip(a.sequences, b.sequences):
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
        assert x.stop_reason == y.stop_reason
    for name in ("prompt_logprobs", "target_prompt_logprobs"):
        if getattr(b, name) is not None:
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-5)


def test_requests_join_a_running_batch_with_the_same_result(engine, adapters, cache_kind):
    """Continuous batching: requests submitted while others decode join them at the next step, and
    every request gets exactly what it gets alone (same seed: same tokens; greedy: the same)."""
    targets = np.full((6, 2), -1, np.int64)
    targets[3] = [5, 9]
    jobs = [
        SampleJob(M, adapters[0], PROMPT, num_samples=3, max_tokens=24, seed=1, stop_token_ids=[]),
        SampleJob(M, adapters[1], PROMPT[:7], num_samples=2, max_tokens=8, seed=2, stop_token_ids=[],
                  prompt_logprobs=True, target_prompt_tokens=targets, topk_sample_logprobs=2),
        SampleJob(M, None, [5, 6, 7], max_tokens=10, temperature=0.0, stop_token_ids=[]),
        SampleJob(M, adapters[0], PROMPT[3:], num_samples=2, max_tokens=0, prompt_logprobs=True),
        SampleJob(M, adapters[1], [9] * 30, num_samples=4, max_tokens=6, seed=3, temperature=0.8, top_p=0.9),
    ]
    alone = [engine.sample([job])[0] for job in jobs]
    arrivals = {0: [jobs[0]], 4: [jobs[1], jobs[2]], 6: [jobs[3]], 9: [jobs[4]]}  # step -> requests arriving
    done, rows_seen = {}, []
    for step in range(100):
        assert engine.submit_samples(arrivals.get(step, [])) == []
        for job, result in engine.step_samples():
            done[jobs.index(job)] = result
        rows_seen.append(engine.stats()["sampling"]["rows"])
        if len(done) == len(jobs) and not engine.sampling:
            break
    assert sorted(done) == list(range(len(jobs)))
    for i, job in enumerate(jobs):
        _same(done[i], alone[i])
    assert rows_seen[4] == 3 + 2 + 1  # the later requests decoded beside the first one
    assert rows_seen[-1] == 0


def test_row_budget_makes_requests_wait_not_fail(engine, adapters, monkeypatch):
    from tinkex.engine import sampler

    monkeypatch.setattr(sampler, "MAX_ROWS_PER_BATCH", 5)
    jobs = [SampleJob(M, adapters[i % 2], PROMPT[: 4 + i], num_samples=3, max_tokens=5 + i, seed=i,
                      stop_token_ids=[]) for i in range(4)]
    together = engine.sample(jobs)
    monkeypatch.undo()
    for job, result in zip(jobs, together):
        _same(result, engine.sample([job])[0])


def test_removing_an_adapter_fails_its_running_requests(engine, new_id):
    aid = new_id()
    engine.create_adapter(aid, M, LoraSpec(rank=2, seed=5))
    doomed = SampleJob(M, aid, PROMPT, max_tokens=50, seed=1, stop_token_ids=[])
    other = SampleJob(M, None, PROMPT, max_tokens=8, seed=1, stop_token_ids=[])
    engine.submit_samples([doomed, other])
    engine.step_samples()
    engine.remove_adapter(aid)
    done = {}
    while engine.sampling:
        done.update((id(job), result) for job, result in engine.step_samples())
    assert isinstance(done[id(doomed)], EngineError) and "was removed" in str(done[id(doomed)])
    _same(done[id(other)], engine.sample([other])[0])


def test_padding_left_by_finished_rows_is_cut_off(engine, cache_kind):
    """A long prompt widens what the short ones beside it attend over; once it finishes, they
    attend over their own tokens only."""
    from tinkex.engine import kvcache

    def width(cache) -> int:  # the columns a decode step attends over
        return cache.max_length if isinstance(cache, kvcache.DenseCache) else cache.attention.shape[1]

    long = SampleJob(M, None, [3] * 30, max_tokens=2, seed=0, stop_token_ids=[])
    short = SampleJob(M, None, [4, 5, 6], max_tokens=8, seed=0, stop_token_ids=[])
    engine.submit_samples([long, short])
    widths, done = [], {}
    while engine.sampling:
        done.update((id(job), result) for job, result in engine.step_samples())
        if engine._decoding[M].rows:
            widths.append(width(engine._decoding[M].cache))
    assert widths[0] == 31 and min(widths) <= 3 + 8  # the short row's own tokens only
    _same(done[id(short)], engine.sample([short])[0])
