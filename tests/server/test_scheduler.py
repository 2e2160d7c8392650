"""The scheduler batches across models: a turn's forward_backward jobs go to the engine as one batch,
in one call with its optimizer steps, each answered to its own future; with engine workers it sends
a turn while the previous one runs."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tinkex.engine import BUILTIN_MODEL, AdamHyper, DatumArrays, Engine, ForwardBackwardJob, LoraSpec
from tinkex.engine.api import Ready
from tinkex.engine.workers import start_pool
from tinkex.server import convert
from tinkex.server.futures import FutureTable, Outcome
from tinkex.server.scheduler import Scheduler, Work
from tinkex.server.store import Store
from tinkex.types import OptimStepResponse


class Logged:
    """The real engine (or worker pool), recording each turn's adapters (forward_backward jobs, steps)
    and logging when each turn is sent and when it is answered."""

    def __init__(self, engine):
        self.engine, self.turns, self.log = engine, [], []

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def submit_training(self, jobs, steps):
        self.turns.append(([job.adapter_id for job in jobs], [adapter_id for adapter_id, _ in steps]))
        turn = len(self.turns)
        self.log.append(("sent", turn))
        reply = self.engine.submit_training(jobs, steps)
        log = self.log

        class Reply(Ready if isinstance(reply, Ready) else object):  # the in-process engine's is Ready
            def result(self):
                log.append(("answered", turn))
                return reply.result()

        return Reply(reply.value) if isinstance(reply, Ready) else Reply()


def test_a_turn_sends_every_model_step_in_one_engine_call(tmp_path, hf_home):
    """Three models' forward_backward jobs make one batch; then their optimizer steps go in one call
    with a fourth model's forward_backward (behind another request in its queue)."""
    engine = Logged(Engine(hf_home=hf_home))
    futures = FutureTable(Store(f"sqlite:///{tmp_path / 'store.db'}"))
    scheduler = Scheduler(engine, futures, prepare_sample=lambda job: None)
    tokens = np.random.default_rng(0).integers(3, 2000, 9)
    datum = DatumArrays(tokens=tokens[:-1], inputs={"target_tokens": tokens[1:], "weights": np.ones(8, np.float32)})
    steps = {}
    for i, model in enumerate(["m0", "m1", "m2"]):
        engine.create_adapter(model, BUILTIN_MODEL, LoraSpec(rank=4, seed=i))
        scheduler.open_model(model)
        fb = Work(future=futures.create("t", "ForwardBackward", model, 0),
                  forward_backward=ForwardBackwardJob(model, [datum], "cross_entropy"),
                  finish=lambda result: Outcome(result=convert.forward_backward_output(result)))
        hyper = AdamHyper(learning_rate=-1.0) if model == "m1" else AdamHyper(learning_rate=1e-2)
        step = Work(future=futures.create("t", "OptimStep", model, 1), optim_step=(model, hyper),
                    finish=lambda metrics: Outcome(result=OptimStepResponse(metrics=metrics)))
        scheduler.submit(model, 0, fb)
        scheduler.submit(model, 1, step)
        steps[model] = step.future
    # A fourth model whose forward_backward comes second in its queue.
    engine.create_adapter("m3", BUILTIN_MODEL, LoraSpec(rank=4, seed=3))
    scheduler.open_model("m3")
    scheduler.submit("m3", 0, Work(future=futures.create("t", "Noop", "m3", 0), run=lambda: Outcome()))
    late = Work(future=futures.create("t", "ForwardBackward", "m3", 1),
                forward_backward=ForwardBackwardJob("m3", [datum], "cross_entropy"),
                finish=lambda result: Outcome(result=convert.forward_backward_output(result)))
    scheduler.submit("m3", 1, late)
    steps["m3"] = late.future
    scheduler.start()  # everything is queued before the first turn
    try:
        deadline = time.monotonic() + 60
        while any(f.outcome is None for f in steps.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.stop()
        futures.close()
    assert engine.turns == [(["m0", "m1", "m2"], []), (["m3"], ["m0", "m1", "m2"])]
    assert steps["m3"].outcome.result.metrics["loss:sum"] > 0
    assert steps["m0"].outcome.result.metrics["grad_norm:mean"] > 0
    assert steps["m2"].outcome.result.metrics["grad_norm:mean"] > 0
    # m1's bad step failed on its own, as the user's error
    assert steps["m1"].outcome.category == "user" and "learning_rate" in steps["m1"].outcome.error


def train_two_models(engine, tmp_path) -> list[float]:
    """Two models, each forward_backward, optim_step, forward_backward, optim_step (four turns); the
    losses of their second forward_backward, which the first step changed."""
    tmp_path.mkdir()
    futures = FutureTable(Store(f"sqlite:///{tmp_path / 'store.db'}"))
    scheduler = Scheduler(engine, futures, prepare_sample=lambda job: None)
    tokens = np.random.default_rng(1).integers(3, 2000, 9)
    datum = DatumArrays(tokens=tokens[:-1], inputs={"target_tokens": tokens[1:], "weights": np.ones(8, np.float32)})
    second = []
    for i, model in enumerate(["a", "b"]):
        engine.create_adapter(model, BUILTIN_MODEL, LoraSpec(rank=4, seed=i))
        scheduler.open_model(model)
        for seq in range(4):
            if seq % 2 == 0:
                work = Work(forward_backward=ForwardBackwardJob(model, [datum], "cross_entropy"),
                            finish=lambda result: Outcome(result=convert.forward_backward_output(result)))
            else:
                work = Work(optim_step=(model, AdamHyper(learning_rate=5e-2)),
                            finish=lambda metrics: Outcome(result=OptimStepResponse(metrics=metrics)))
            work.future = futures.create("t", "Train", model, seq)
            scheduler.submit(model, seq, work)
            if seq == 2:
                second.append(work.future)
    scheduler.start()
    try:
        deadline = time.monotonic() + 60
        while any(f.outcome is None for f in second) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.stop()
        futures.close()
    return [f.outcome.result.metrics["loss:sum"] for f in second]


def test_engine_workers_get_the_next_turn_while_one_runs(tmp_path, hf_home):
    """With a worker process the scheduler sends turn n + 1 before it answers turn n (the worker runs
    its calls in order, so it never waits between turns); the numbers are the in-process engine's,
    which answers each turn as soon as it is sent (it has run it)."""
    pool = Logged(start_pool([BUILTIN_MODEL], 1, torch_threads=1, hf_home=hf_home))
    try:
        through_worker = train_two_models(pool, tmp_path / "pool")
    finally:
        pool.close()
    assert pool.log == [("sent", 1), ("sent", 2), ("answered", 1), ("sent", 3), ("answered", 2),
                        ("sent", 4), ("answered", 3), ("answered", 4)]
    in_process = Logged(Engine(hf_home=hf_home))
    assert train_two_models(in_process, tmp_path / "engine") == pytest.approx(through_worker, rel=1e-5)
    assert in_process.log == [(event, turn) for turn in (1, 2, 3, 4) for event in ("sent", "answered")]


def test_a_burst_of_sample_requests_starts_together(tmp_path, hf_home, monkeypatch):
    """With nothing decoding, sample requests that keep arriving (a client's concurrent calls) are
    admitted in one engine call, however many decode steps the first could have run meanwhile; a
    burst longer than MAX_GATHER starts without its tail, which joins at the next step."""
    from tinkex.engine import SampleJob
    from tinkex.server import scheduler as scheduling

    class Admissions:
        def __init__(self, engine):
            self.engine, self.sizes = engine, []

        def __getattr__(self, name: str):
            return getattr(self.engine, name)

        def submit_samples(self, jobs):
            self.sizes.append(len(jobs))
            return self.engine.submit_samples(jobs)

    engine = Admissions(Engine(hf_home=hf_home))
    futures = FutureTable(Store(f"sqlite:///{tmp_path / 'store.db'}"))
    scheduler = Scheduler(engine, futures, prepare_sample=lambda job: None)
    monkeypatch.setattr(scheduling, "MAX_GATHER_GAP", 0.1)  # what a slow model's quarter step allows
    monkeypatch.setattr(scheduling, "MAX_GATHER", 5.0)
    scheduler.start()

    def burst(count: int, spacing: float) -> list:
        scheduler._step_seconds = 1.0  # as if a decode step took a second
        works = []
        for i in range(count):
            work = Work(future=futures.create("t", "Sample"), sample=SampleJob(BUILTIN_MODEL, None, [5, 6, 7], max_tokens=2),
                        finish=lambda result: Outcome())
            scheduler.submit_sample(None, work)
            works.append(work)
            time.sleep(spacing)
        deadline = time.monotonic() + 60
        while any(w.future.outcome is None for w in works) and time.monotonic() < deadline:
            time.sleep(0.01)
        return [w.future.outcome for w in works]

    try:
        assert all(outcome.error is None for outcome in burst(8, 0.01))
        assert engine.sizes == [8]
        monkeypatch.setattr(scheduling, "MAX_GATHER", 0.03)  # the first waits no longer than this
        engine.sizes.clear()
        assert all(outcome.error is None for outcome in burst(8, 0.01))
        assert len(engine.sizes) > 1 and sum(engine.sizes) == 8
    finally:
        scheduler.stop()
        futures.close()
