"""Idle adapters leave the fast memory and come back exactly as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinkex.engine import AdamHyper, Engine, ForwardBackwardJob, LoraSpec, SampleJob

from .conftest import M, random_datum

SPECS = [LoraSpec(rank=2, seed=1), LoraSpec(rank=4, seed=2, train_mlp=False), LoraSpec(rank=8, seed=3),
         LoraSpec(rank=3, seed=4, train_attn=False)]


def _round_robin(engine: Engine, rounds: int = 3) -> dict:
    """Four adapters of different ranks take turns: forward_backward, sometimes a second one before the
    step (so a gradient is pending when another adapter pushes it out), optim_step, and a sample."""
    ids = [f"rr-{i}" for i in range(len(SPECS))]
    for aid, spec in zip(ids, SPECS):
        engine.create_adapter(aid, M, spec)
    rng = np.random.default_rng(0)
    record: dict[str, list] = {aid: [] for aid in ids}
    for r in range(rounds):
        for i, aid in enumerate(ids):
            data = [random_datum(rng, 6 + i), random_datum(rng, 4)]
            (out,) = engine.forward_backward([ForwardBackwardJob(aid, data, "cross_entropy")])
            record[aid].append(out.metrics["loss:sum"])
            if (r + i) % 2:  # the gradient waits while the next adapter runs
                continue
            record[aid].append(engine.optim_step(aid, AdamHyper(learning_rate=1e-2))["grad_norm:mean"])
            (sample,) = engine.sample([SampleJob(M, aid, [1, 2, 3], max_tokens=5, seed=r, stop_token_ids=[])])
            record[aid].append(sample.sequences[0].tokens.tolist())
    weights = {aid: {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in engine.adapter_tensors(aid).items()}
               for aid in ids}
    return {"record": record, "weights": weights}


def test_a_budget_of_two_gives_the_results_of_no_budget(engine_hf_home, tmp_path):
    unlimited = Engine(hf_home=engine_hf_home)
    budgeted = Engine(hf_home=engine_hf_home, max_resident_adapters=2, spill_dir=tmp_path / "spill")
    want = _round_robin(unlimited)
    got = _round_robin(budgeted)
    assert got["record"] == want["record"]  # bitwise: parking is a copy, not a computation
    for aid, tensors in want["weights"].items():
        for path, (a, b) in tensors.items():
            assert torch.equal(got["weights"][aid][path][0], a) and torch.equal(got["weights"][aid][path][1], b)
    stats = budgeted.stats()
    assert stats["parks"] > 10 and stats["unparks"] > 10
    assert stats["adapters"]["resident"] <= 2 and stats["adapters"]["parked"] >= 2
    assert unlimited.stats()["parks"] == 0
    # parked adapters are out of the LoRA modules and on disk, one file each
    resident = {a for m in budgeted._bases[M].modules.values() for a in m.adapters}
    assert len(resident) <= 2
    assert len(list((tmp_path / "spill").glob("*.safetensors"))) == stats["adapters"]["parked"]
    for aid in budgeted.adapter_ids():
        budgeted.remove_adapter(aid)
    assert list((tmp_path / "spill").glob("*")) == [] and budgeted.stats()["adapters"]["total"] == 0


def test_parking_in_memory_without_a_spill_dir(engine_hf_home):
    engine = Engine(hf_home=engine_hf_home, max_resident_adapters=1)
    for aid in ("m-a", "m-b"):
        engine.create_adapter(aid, M, LoraSpec(rank=2, seed=0))
    assert engine.stats()["adapters"] == {"total": 2, "resident": 1, "parked": 1, "budget": 1}
    (out,) = engine.forward_backward([ForwardBackwardJob("m-a", [random_datum(np.random.default_rng(1), 5)],
                                                         "cross_entropy")])
    assert out.metrics["loss:sum"] > 0 and engine.stats()["adapters"]["parked"] == 1


def test_running_samples_keep_their_adapters_resident(engine_hf_home):
    engine = Engine(hf_home=engine_hf_home, max_resident_adapters=1)
    engine.create_adapter("s-a", M, LoraSpec(rank=2, seed=0))
    job = SampleJob(M, "s-a", [1, 2, 3], max_tokens=6, seed=0, stop_token_ids=[])
    engine.submit_samples([job])
    engine.step_samples()
    engine.create_adapter("s-b", M, LoraSpec(rank=2, seed=1))  # over budget, but s-a is decoding
    assert engine.stats()["adapters"]["parked"] == 0
    results = []
    while engine.sampling:
        results += engine.step_samples()
    assert [r.sequences[0].tokens.tolist() for _, r in results] == [engine.sample([job])[0].sequences[0].tokens.tolist()]


def test_budget_must_be_positive(engine_hf_home):
    with pytest.raises(ValueError, match="at least 1"):
        Engine(hf_home=engine_hf_home, max_resident_adapters=0)
