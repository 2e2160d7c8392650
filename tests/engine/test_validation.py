"""Bad input gets an EngineError that says what is wrong, in its own slot; the rest still runs."""

from __future__ import annotations

import numpy as np
import pytest

from tinkex.engine import DatumArrays, EngineError, ForwardBackwardJob, LoraSpec

from .conftest import M, V, datum, random_datum


@pytest.fixture(scope="module")
def aid(engine):
    engine.create_adapter("validation", M, LoraSpec(rank=2, seed=0))
    yield "validation"
    engine.remove_adapter("validation")


def rl_datum(n=4, **override):
    rng = np.random.default_rng(n)
    d = random_datum(rng, n, logprobs=np.full(n, -7.0), advantages=np.ones(n))
    d.inputs.update(override)
    return d


CE = "cross_entropy"
TWO_D = dict(logprobs=np.zeros((2, 2)), advantages=np.zeros((2, 2)))
FLOAT_TOKENS = DatumArrays(np.array([1.0, 2.0]), {"target_tokens": np.array([2, 3])})
BAD_JOBS = {  # name: (datums, loss, loss_fn_config, what the error must say)
    "token id too large": ([datum([1, 2, V])], CE, {}, "outside the vocabulary"),
    "negative token id": ([datum([1, -1, 2])], CE, {}, "outside the vocabulary"),
    "target id too large": ([datum([1, 2], [2, V + 5])], CE, {}, "target_tokens: token id"),
    "missing targets": ([DatumArrays(np.array([1, 2]), {})], CE, {}, "'target_tokens'"),
    "length mismatch": ([datum([1, 2, 3], [2, 3])], CE, {}, "length 2 but tokens has 3"),
    "weights shape": ([datum([1, 2, 3], weights=[1, 1])], CE, {}, "weights has shape"),
    "nan weight": ([datum([1, 2, 3], weights=[1, np.nan, 1])], CE, {}, "NaN"),
    "inf advantage": ([rl_datum(advantages=np.array([1, np.inf, 1, 1], np.float32))], "ppo", {}, "NaN or infinity"),
    "missing advantages": ([datum([1, 2, 3], logprobs=[-1, -1, -1])], "importance_sampling", {}, "'advantages'"),
    "2-d targets for ppo": ([datum([1, 2], [[1, 2], [3, 4]], **TWO_D)], "ppo", {}, "shape [T]"),
    "float tokens": ([FLOAT_TOKENS], CE, {}, "integers"),
    "empty tokens": ([datum([], [])], CE, {}, "non-empty"),
    "too long": ([datum(np.ones(8193, np.int64))], CE, {}, "exceed the model's context"),
    "unknown loss": ([datum([1, 2])], "hinge", {}, "unknown loss 'hinge'"),
    "not served": ([datum([1, 2])], "custom", {}, "unsupported loss 'custom'"),
    "bad mask shape": ([rl_datum(sequence_ratio_mask=np.ones(3, np.float32))], "gspo", {}, "sequence_ratio_mask has shape"),
    "missing logprobs": ([datum([1, 2, 3], advantages=[1, 1, 1])], "stable_reinforce", {}, "'logprobs'"),
    "negative kl": ([rl_datum()], "stable_reinforce", {"kl_coeff": -1}, "kl_coeff must be >= 0"),
    "bad config": ([rl_datum()], "ppo", {"clip_low_threshold": "x"}, "must be a number"),
    "inverted clip": ([rl_datum()], "cispo", {"clip_low_threshold": 1.5}, "must not exceed"),
}


def _good(aid):
    return ForwardBackwardJob(aid, [random_datum(np.random.default_rng(1), 6)], CE, forward_only=True)


def _check_isolated(engine, aid, bad, message):
    out_good, out_bad, out_good2 = engine.forward_backward([_good(aid), bad, _good(aid)])
    assert isinstance(out_bad, EngineError) and message in str(out_bad), str(out_bad)
    (alone,) = engine.forward_backward([_good(aid)])
    for out in (out_good, out_good2):
        np.testing.assert_allclose(out.outputs[0]["logprobs"], alone.outputs[0]["logprobs"], atol=1e-6)
        assert out.metrics["loss:sum"] == pytest.approx(alone.metrics["loss:sum"], abs=1e-5)


@pytest.mark.parametrize("name", BAD_JOBS)
def test_bad_job_fails_alone(engine, aid, name):
    data, loss, config, message = BAD_JOBS[name]
    _check_isolated(engine, aid, ForwardBackwardJob(aid, data, loss, config), message)


def test_unknown_adapter_fails_alone(engine, aid):
    _check_isolated(engine, aid, ForwardBackwardJob("nope", [datum([1, 2])], CE), "unknown adapter 'nope'")


def test_defaults_and_edge_cases(engine, aid):
    d = datum([4, 5, 6])
    with_weights = datum([4, 5, 6], weights=[1, 1, 1])
    extra = datum([4, 5, 6], weights=[1, 1, 1], mask=[1, 1, 1])  # inputs a loss does not use are ignored
    ints = DatumArrays(np.array([4, 5, 6], np.int32), {"target_tokens": np.array([5, 6, 4], np.int32)})
    results = engine.forward_backward([ForwardBackwardJob(aid, [x], "cross_entropy", forward_only=True)
                                       for x in (d, with_weights, extra, ints)])
    losses = [r.metrics["loss:sum"] for r in results]
    assert losses == pytest.approx([losses[0]] * 4)  # missing weights = ones; int32 accepted
    (empty,) = engine.forward_backward([ForwardBackwardJob(aid, [], "cross_entropy")])
    assert empty.outputs == [] and empty.metrics["loss:sum"] == 0.0
    unused_config = ForwardBackwardJob(aid, [d], CE, {"beta": 3.0}, forward_only=True)
    (ignored,) = engine.forward_backward([unused_config])
    assert ignored.metrics["loss:sum"] == pytest.approx(losses[0])


@pytest.mark.parametrize("spec, base, message", [
    (LoraSpec(rank=0), M, "rank"),
    (LoraSpec(rank=-3), M, "rank"),
    (LoraSpec(rank=4, train_attn=False, train_mlp=False, train_unembed=False), M, "trains nothing"),
    (LoraSpec(rank=4), "not/served", "not served"),
])
def test_create_adapter_errors(engine, spec, base, message):
    with pytest.raises(EngineError, match=message):
        engine.create_adapter("bad-spec", base, spec)
    assert not engine.has_adapter("bad-spec")


def test_duplicate_and_unknown_ids(engine, aid):
    with pytest.raises(EngineError, match="already exists"):
        engine.create_adapter(aid, M, LoraSpec(rank=2))
    with pytest.raises(EngineError, match="unknown adapter"):
        engine.remove_adapter("never-created")
    with pytest.raises(EngineError, match="not served"):
        engine.model_info("other/model")
