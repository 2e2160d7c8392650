"""Regularizers through forward_backward_custom on a real server: values, gradients, parallelism."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from tinkex import types
from tinkex.client import regularizers as R
from tinkex.client import telemetry

from .conftest import MODEL

SEQS = [list(range(5, 25)), list(range(40, 52)), list(range(100, 130))]


def _data(reference: list[np.ndarray] | None = None) -> list[types.Datum]:
    data = []
    for i, tokens in enumerate(SEQS):
        n = len(tokens) - 1
        weights = np.ones(n, np.float32)
        weights[: n // 3] = 0  # a "prompt" part that no loss should see
        inputs = {"target_tokens": np.array(tokens[1:]), "weights": weights}
        if reference is not None:
            inputs["reference_logprobs"] = reference[i].astype(np.float32)
            inputs["original_logprobs"] = (reference[i] - 0.5).astype(np.float32)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs))
    return data


@pytest.fixture(scope="module")
def trainer(service_client):
    return service_client.create_lora_training_client(MODEL, rank=8, seed=21).result(60)


def _logprobs(trainer, data) -> list[np.ndarray]:
    out = trainer.forward(data, "cross_entropy").result(60)
    return [o["logprobs"].to_numpy().astype(np.float64) for o in out.loss_fn_outputs]


def test_every_builtin_term_is_computed_weighted_and_reported(trainer):
    reference = [lp + np.random.default_rng(0).normal(0, 0.3, lp.shape) for lp in _logprobs(trainer, _data())]
    data = _data(reference)
    lps = _logprobs(trainer, data)
    masks = [d.loss_fn_inputs["weights"].to_numpy() > 0 for d in data]
    picked = np.concatenate([lp[m] for lp, m in zip(lps, masks)])
    ref = np.concatenate([r[m] for r, m in zip(reference, masks)])
    orig = ref - 0.5
    r = ref - picked

    def mine(data, logprobs):
        return sum((lp ** 2).sum() for lp in logprobs) / 100, {"calls": 1.0}

    async def remote(data, logprobs):  # an async term: e.g. a score from another service
        await asyncio.sleep(0.01)
        return torch.stack([lp.mean() for lp in logprobs]).sum()

    loss = R.RegularizedLoss("cross_entropy", [
        R.l1(0.1), R.l2(0.01), R.elastic_net(0.05, l1_ratio=0.3), R.entropy(0.2, mode="maximize"),
        R.kl(0.5, reference="reference_logprobs"), R.consistency(0.3, pair_field="original_logprobs"),
        R.orthogonality(2.0), R.gradient_penalty(0.1, target_norm=1.0), R.Regularizer(mine, 0.7, name="mine"),
        R.Regularizer(remote, 0.4, name="remote"),
    ], track_grad_norms=True)
    with telemetry.capture("tinkex.") as events:
        out = trainer.forward_backward_custom(data, loss).result(120)
    m = out.metrics

    expected = {
        "l1": np.abs(picked).sum(), "l2": (picked ** 2).sum(),
        "elastic_net": 0.3 * np.abs(picked).sum() + 0.7 * (picked ** 2).sum(),
        "entropy": -(-picked).mean(), "kl": (np.expm1(r) - r).mean(), "consistency": ((picked - orig) ** 2).mean(),
        "mine": sum((lp ** 2).sum() for lp in lps) / 100, "remote": sum(lp.mean() for lp in lps),
    }
    for name, value in expected.items():
        assert m[f"reg/{name}/value"] == pytest.approx(value, rel=2e-3, abs=1e-3), name
    rows = [lp[mask] for lp, mask in zip(lps, masks)]
    width = max(len(x) for x in rows)
    matrix = np.stack([np.pad(x, (0, width - len(x))) / np.linalg.norm(x) for x in rows])
    gram = matrix @ matrix.T
    assert m["reg/orthogonality/value"] == pytest.approx((gram[~np.eye(3, dtype=bool)] ** 2).mean(), rel=2e-3)
    base = sum(-(lp * d.loss_fn_inputs["weights"].to_numpy()).sum() for lp, d in zip(lps, data))
    assert m["base_loss"] == pytest.approx(base, rel=1e-3)
    # the gradient of cross_entropy w.r.t. each logprob is -weight: its norm is sqrt(#weighted tokens)
    assert m["reg/gradient_penalty/base_grad_norm"] == pytest.approx(np.sqrt(sum(x.sum() for x in masks)), rel=1e-4)
    assert m["reg/gradient_penalty/grad_norm"] == 0.0  # linear base: its gradient norm does not move
    assert m["reg/mine/calls"] == 1.0 and m["reg/entropy/entropy"] == pytest.approx((-picked).mean(), rel=2e-3)
    # total = base + sum(weight * value); the SDK reports it as the step's loss
    contributions = sum(m[f"reg/{n}/contribution"] for n in [*expected, "orthogonality", "gradient_penalty"])
    assert m["regularizer_total"] == pytest.approx(contributions, rel=1e-6)
    assert m["loss:sum"] == pytest.approx(m["loss_total"]) == pytest.approx(base + contributions, rel=1e-3)
    for name in (*expected, "orthogonality"):
        assert m[f"reg/{name}/grad_norm_weighted"] == pytest.approx(m[f"reg/{name}/grad_norm"] *
                                                                    loss.last.regularizers[name].weight)
    assert m["reg/l2/grad_norm"] == pytest.approx(2 * np.linalg.norm(picked), rel=1e-3)
    assert m["total/grad_norm"] > 0 and m["base/grad_norm"] == pytest.approx(np.sqrt(sum(x.sum() for x in masks)))
    assert loss.last.to_dict()["regularizers"]["kl"]["weight"] == 0.5
    names = [e.name for e in events]
    assert names.count(telemetry.REGULARIZER) == 10 and telemetry.CUSTOM_LOSS in names
    assert telemetry.FORWARD_BACKWARD_CUSTOM in names


def test_the_gradient_the_server_gets_is_that_of_the_whole_combination(trainer):
    """With only cross_entropy the custom path matches the built-in loss; an L2 term changes the step."""
    data = _data()
    plain = trainer.forward_backward(data, "cross_entropy").result(60)
    custom = trainer.forward_backward_custom(data, R.RegularizedLoss("cross_entropy")).result(60)
    assert custom.metrics["loss:sum"] == pytest.approx(plain.metrics["loss:sum"], rel=1e-4)
    assert custom.metrics["surrogate_loss:sum"] == pytest.approx(plain.metrics["loss:sum"], rel=1e-4)
    trainer.optim_step(types.AdamParams(learning_rate=0.0)).result(60)  # drop those gradients

    # a strong "minimize entropy" term with no base loss: the targets' logprobs rise
    before = _logprobs(trainer, data)
    loss = R.RegularizedLoss(None, [R.entropy(1.0, mode="minimize")])
    for _ in range(3):
        trainer.forward_backward_custom(data, loss).result(60)
        trainer.optim_step(types.AdamParams(learning_rate=2e-2)).result(60)
    after = _logprobs(trainer, data)
    masks = [d.loss_fn_inputs["weights"].to_numpy() > 0 for d in data]
    assert np.concatenate([a[m] for a, m in zip(after, masks)]).mean() > \
        np.concatenate([b[m] for b, m in zip(before, masks)]).mean() + 0.1


def test_terms_run_in_parallel_and_time_out():
    data = _data()
    logprobs = [torch.tensor(np.linspace(-3, -0.1, len(t) - 1), dtype=torch.float32, requires_grad=True)
                for t in SEQS]
    running, peak = [0], [0]
    lock = threading.Lock()

    def slow(data, lps):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        return lps[0].sum()

    async def slow_async(data, lps):
        await asyncio.sleep(0.3)
        return lps[1].sum()

    terms = [R.Regularizer(slow, name=f"s{i}") for i in range(3)] + \
            [R.Regularizer(slow_async, name=f"a{i}") for i in range(3)]
    started = time.monotonic()
    total, metrics = R.RegularizedLoss(None, terms)(data, logprobs)
    assert time.monotonic() - started < 1.2  # six 0.3 s terms, not 1.8 s
    assert peak[0] >= 2
    expected = 3 * float(logprobs[0].sum().detach()) + 3 * float(logprobs[1].sum().detach())
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    sequential = R.RegularizedLoss(None, terms[:3], parallel=False)
    peak[0] = 0
    sequential(data, logprobs)
    assert peak[0] == 1

    with pytest.raises(TimeoutError, match="s0"):
        R.RegularizedLoss(None, [R.Regularizer(slow, name="s0", timeout_s=0.05), R.l1()])(data, logprobs)
    with pytest.raises(RuntimeError, match="a0"):
        R.RegularizedLoss(None, [R.Regularizer(slow_async, name="a0", timeout_s=0.05)])(data, logprobs)
    with pytest.raises(ValueError, match="unique"):
        R.RegularizedLoss(None, [R.l1(), R.l1()])
    with pytest.raises(ValueError):
        R.l1(-1.0)
    with pytest.raises(TypeError, match="bad"):
        R.RegularizedLoss(None, [R.Regularizer(lambda d, l: "no", name="bad")])(data, logprobs)
    with pytest.raises(KeyError, match="reference_logprobs"):
        R.RegularizedLoss(None, [R.kl()])(data, logprobs)  # the field is missing from these datums
