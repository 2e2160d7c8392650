"""The scheduler batches across models: a turn's forward_backward jobs go to the engine as one batch,
in one call with its optimizer steps, each answered to its own future."""

from __future__ import annotations

import time

import numpy as np

from tinkex.engine import BUILTIN_MODEL, AdamHyper, DatumArrays, Engine, ForwardBackwardJob, LoraSpec
from tinkex.server import convert
from tinkex.server.futures import FutureTable, Outcome
from tinkex.server.scheduler import Scheduler, Work
from tinkex.server.store import Store
from tinkex.types import OptimStepResponse


class Recording:
    """The real engine, with a record of the batch sizes it was called with."""

    def __init__(self, engine: Engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def run_training(self, jobs, steps):
        self.calls.append(([job.adapter_id for job in jobs], [adapter_id for adapter_id, _ in steps]))
        return self.engine.run_training(jobs, steps)


def test_a_turn_sends_every_model_step_in_one_engine_call(tmp_path, hf_home):
    """Three models' forward_backward jobs make one batch; then their optimizer steps go in one call
    with a fourth model's forward_backward."""
    engine = Recording(Engine(hf_home=hf_home))
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
    # A fourth model whose forward_backward comes second in its queue: it runs in the steps' turn.
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
    assert engine.calls == [(["m0", "m1", "m2"], []), (["m3"], ["m0", "m1", "m2"])]
    assert steps["m3"].outcome.result.metrics["loss:sum"] > 0
    assert steps["m0"].outcome.result.metrics["grad_norm:mean"] > 0
    assert steps["m2"].outcome.result.metrics["grad_norm:mean"] > 0
    # m1's bad step failed on its own, as the user's error
    assert steps["m1"].outcome.category == "user" and "learning_rate" in steps["m1"].outcome.error
