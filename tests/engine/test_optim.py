"""optim_step is AdamW as torch.optim.AdamW computes it, per adapter, with global-norm clipping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinkex.engine import AdamHyper, EngineError, ForwardBackwardJob, LoraSpec

from .conftest import M, random_datum, randomize_b


def test_matches_torch_adamw_with_weight_decay_and_clipping(engine, new_id):
    aid = new_id()
    engine.create_adapter(aid, M, LoraSpec(rank=4, seed=9))
    randomize_b(engine, aid, seed=9)
    tensors = engine.adapter_tensors(aid)
    mirror = [t.detach().clone().requires_grad_(True) for pair in tensors.values() for t in pair]
    reference = torch.optim.AdamW(mirror, lr=1.0)  # hyperparameters are set per step, as the engine gets them
    rng = np.random.default_rng(0)
    steps = [
        AdamHyper(learning_rate=1e-2, weight_decay=0.1, grad_clip_norm=0.5),  # clips
        AdamHyper(learning_rate=5e-3, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1e6),
        AdamHyper(learning_rate=2e-2, weight_decay=0.05),  # no clipping
    ]
    for hyper in steps:
        data = [random_datum(rng, 9), random_datum(rng, 4)]
        engine.forward_backward([ForwardBackwardJob(aid, data, "cross_entropy")])
        engine_grads = [t.grad.clone() for pair in tensors.values() for t in pair]
        for p, g in zip(mirror, engine_grads):
            p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(mirror, hyper.grad_clip_norm) if hyper.grad_clip_norm else None
        for group in reference.param_groups:
            group.update(lr=hyper.learning_rate, betas=(hyper.beta1, hyper.beta2), eps=hyper.eps,
                         weight_decay=hyper.weight_decay)
        reference.step()
        metrics = engine.optim_step(aid, hyper)
        assert all(key.count(":") == 1 for key in metrics)
        expected_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in engine_grads])).item()
        assert metrics["grad_norm:mean"] == pytest.approx(expected_norm, rel=1e-5)
        if norm is not None:
            assert norm.item() == pytest.approx(expected_norm, rel=1e-5)
        got = [t for pair in tensors.values() for t in pair]
        for g, w in zip(got, mirror):
            torch.testing.assert_close(g, w.detach(), rtol=1e-6, atol=1e-7)
    assert steps[0].grad_clip_norm < torch.linalg.vector_norm(torch.stack([g.norm() for g in engine_grads]))  # did clip
    engine.remove_adapter(aid)


def test_optim_steps_of_many_adapters_in_one_call(engine, new_id):
    """optim_steps is optim_step for each adapter in turn; a bad step gets its error, the rest run."""
    together, alone = [new_id(), new_id()], [new_id(), new_id()]
    for i, aid in enumerate(together + alone):
        engine.create_adapter(aid, M, LoraSpec(rank=4, seed=i % 2))
    data = [random_datum(np.random.default_rng(3), 7)]
    hypers = [AdamHyper(learning_rate=1e-2), AdamHyper(learning_rate=3e-2, weight_decay=0.1)]
    engine.forward_backward([ForwardBackwardJob(aid, data, "cross_entropy") for aid in together + alone])
    results = engine.optim_steps([(together[0], hypers[0]), ("nope", hypers[0]),
                                  (together[1], AdamHyper(eps=0)), (together[1], hypers[1])])
    assert isinstance(results[1], EngineError) and "nope" in str(results[1])
    assert isinstance(results[2], EngineError) and "eps" in str(results[2])
    expected = [engine.optim_step(aid, hyper) for aid, hyper in zip(alone, hypers)]
    assert [results[0], results[3]] == expected
    for mine, reference in zip(together, alone):
        for (a, b), (ra, rb) in zip(engine.adapter_tensors(mine).values(), engine.adapter_tensors(reference).values()):
            assert torch.equal(a, ra) and torch.equal(b, rb)
    for aid in together + alone:
        engine.remove_adapter(aid)


def test_optimizer_state_is_per_adapter(engine, new_id):
    """Stepping one adapter leaves another's weights and moments alone."""
    a, b = new_id(), new_id()
    for aid in (a, b):
        engine.create_adapter(aid, M, LoraSpec(rank=2, seed=1))
    rng = np.random.default_rng(2)
    job_data = [random_datum(rng, 6)]
    before_b = {k: (x.clone(), y.clone()) for k, (x, y) in engine.adapter_tensors(b).items()}
    for _ in range(2):
        engine.forward_backward([ForwardBackwardJob(a, job_data, "cross_entropy"),
                                 ForwardBackwardJob(b, job_data, "cross_entropy")])
        engine.optim_step(a, AdamHyper(learning_rate=1e-2))
    assert all(torch.equal(x, before_b[k][0]) and torch.equal(y, before_b[k][1])
               for k, (x, y) in engine.adapter_tensors(b).items())
    # b's gradient from both calls is still waiting for its own step
    assert all(y.grad is not None for _, y in engine.adapter_tensors(b).values())
    engine.optim_step(b, AdamHyper(learning_rate=1e-2))
    # b took one step from its two accumulated gradients, a took two steps: they differ
    assert not torch.equal(engine.adapter_tensors(a)["lm_head"][1], engine.adapter_tensors(b)["lm_head"][1])
    for aid in (a, b):
        engine.remove_adapter(aid)


@pytest.mark.parametrize("hyper, message", [
    (AdamHyper(learning_rate=-1.0), "learning_rate"),
    (AdamHyper(learning_rate=float("nan")), "learning_rate"),
    (AdamHyper(beta1=1.0), "beta1"),
    (AdamHyper(beta2=-0.1), "beta2"),
    (AdamHyper(eps=0.0), "eps"),
    (AdamHyper(weight_decay=float("inf")), "weight_decay"),
    (AdamHyper(grad_clip_norm=-1.0), "grad_clip_norm"),
])
def test_bad_hyperparameters(engine, new_id, hyper, message):
    aid = new_id()
    engine.create_adapter(aid, M, LoraSpec(rank=2, seed=1))
    engine.forward_backward([ForwardBackwardJob(aid, [random_datum(np.random.default_rng(0), 4)], "cross_entropy")])
    before = {k: y.clone() for k, (_, y) in engine.adapter_tensors(aid).items()}
    with pytest.raises(EngineError, match=message):
        engine.optim_step(aid, hyper)
    assert all(torch.equal(y, before[k]) for k, (_, y) in engine.adapter_tensors(aid).items())
    engine.optim_step(aid, AdamHyper(learning_rate=1e-2))  # the gradient is still there and usable
    assert not all(torch.equal(y, before[k]) for k, (_, y) in engine.adapter_tensors(aid).items())
    engine.remove_adapter(aid)


def test_optim_step_unknown_adapter(engine):
    with pytest.raises(EngineError, match="unknown adapter"):
        engine.optim_step("nope", AdamHyper())
