"""Engine workers: the same training loop and sampling through two local worker processes as through
the in-process Engine give the same numbers and tokens; adapters are spread over the workers;
checkpoints written by one worker load on the other; a killed worker fails its requests clearly."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from tinkex.engine import AdamHyper, Engine, EngineError, ForwardBackwardJob, LoraSpec, SampleJob
from tinkex.engine.workers import WorkerDied, WorkerPool, start_pool

from .conftest import M, datum

DATA = {"a": [datum([5, 17, 99, 3, 250, 8]), datum([40, 41, 42, 43])],
        "b": [datum([7, 300, 12, 12, 9, 61, 2])]}
HYPER = AdamHyper(learning_rate=2e-2)


@pytest.fixture(scope="module")
def pool(engine_hf_home) -> WorkerPool:
    pool = start_pool([M], 2, torch_threads=1, hf_home=engine_hf_home)
    yield pool
    pool.close()


def run_samples(engine, jobs: list[SampleJob]) -> list:
    """Submit, then step until every job is done; results in the order of `jobs`."""
    results = {id(job): exc for job, exc in engine.submit_samples(jobs)}
    while engine.sampling:
        for job, result in engine.step_samples():
            results[id(job)] = result
    return [results[id(job)] for job in jobs]


def training_loop(engine, directory) -> dict:
    """Two seeded adapters trained together; state and sampler weights saved and loaded under new
    ids; greedy, seeded and base-model samples with prompt logprobs and streaming."""
    observed: dict = {"losses": [], "grad_norms": []}
    engine.create_adapter("a", M, LoraSpec(rank=4, seed=1))
    engine.create_adapter("b", M, LoraSpec(rank=8, seed=2, train_unembed=False))
    for _ in range(4):
        results = engine.forward_backward([ForwardBackwardJob(name, DATA[name], "cross_entropy") for name in "ab"])
        observed["losses"].append([r.metrics["loss:sum"] for r in results])
        # Both adapters' steps in one call (the pool sends each worker its own, in parallel).
        observed["grad_norms"].append([m["grad_norm:mean"] for m in engine.optim_steps([(n, HYPER) for n in "ab"])])
    engine.save_state("b", directory / "b-state", optimizer=True)
    engine.load_state("b2", directory / "b-state", optimizer=True)
    engine.save_sampler_weights("a", directory / "a-sampler")
    engine.load_sampler_weights("a-sampler", directory / "a-sampler")
    # The loaded copy trains on exactly like the original (weights and Adam moments came along).
    results = engine.forward_backward([ForwardBackwardJob(name, DATA["b"], "cross_entropy") for name in ("b", "b2")])
    observed["resumed"] = [r.metrics["loss:sum"] for r in results]
    observed["resumed_steps"] = [engine.optim_step(name, HYPER)["grad_norm:mean"] for name in ("b", "b2")]
    forward = engine.forward_backward([ForwardBackwardJob("b2", DATA["b"], "cross_entropy", forward_only=True)])
    observed["logprobs"] = forward[0].outputs[0]["logprobs"]

    streamed: list = []
    jobs = [SampleJob(M, "a-sampler", [5, 17, 99], max_tokens=6, temperature=0, prompt_logprobs=True,
                      on_tokens=lambda index, tokens: streamed.append((index, list(tokens)))),
            SampleJob(M, "b2", [7, 300], num_samples=2, max_tokens=5, seed=11, topk_sample_logprobs=2),
            SampleJob(M, None, [40, 41, 42], max_tokens=4, seed=3, topk_prompt_logprobs=2)]
    observed["samples"] = run_samples(engine, jobs)
    observed["streamed"] = streamed
    return observed


def test_two_worker_processes_match_the_in_process_engine(pool, engine_hf_home, tmp_path):
    expected = training_loop(Engine(hf_home=engine_hf_home), tmp_path / "in-process")
    got = training_loop(pool, tmp_path / "workers")

    # Adapters are spread: a and b on different workers, and each checkpoint was loaded by the other
    # worker (through the shared directory), the least loaded one at the time.
    placement = pool.placement()
    assert placement["a"] != placement["b"]
    assert placement["b2"] != placement["b"] and placement["a-sampler"] != placement["a"]
    assert {name: s["adapters"]["total"] for name, s in pool.stats()["workers"].items()} == {
        "worker-0": 2, "worker-1": 2}

    np.testing.assert_allclose(got["losses"], expected["losses"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norms"], expected["grad_norms"], rtol=1e-4)
    assert expected["losses"][-1][0] < expected["losses"][0][0]  # it trains
    np.testing.assert_allclose(got["resumed"], expected["resumed"], rtol=1e-5)
    assert got["resumed"][0] == pytest.approx(got["resumed"][1], rel=1e-6)
    np.testing.assert_allclose(got["resumed_steps"], expected["resumed_steps"], rtol=1e-4)
    np.testing.assert_allclose(got["logprobs"], expected["logprobs"], rtol=1e-5, atol=1e-6)

    for mine, theirs in zip(got["samples"], expected["samples"], strict=True):
        assert [s.tokens.tolist() for s in mine.sequences] == [s.tokens.tolist() for s in theirs.sequences]
        assert [s.stop_reason for s in mine.sequences] == [s.stop_reason for s in theirs.sequences]
        for s, t in zip(mine.sequences, theirs.sequences, strict=True):
            np.testing.assert_allclose(s.logprobs, t.logprobs, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["samples"][0].prompt_logprobs, expected["samples"][0].prompt_logprobs,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got["samples"][1].sequences[0].topk_token_ids,
                                  expected["samples"][1].sequences[0].topk_token_ids)
    np.testing.assert_array_equal(got["samples"][2].topk_prompt_token_ids, expected["samples"][2].topk_prompt_token_ids)
    # Streaming crossed the process boundary: one update per decoded token, ending in the final tokens.
    assert got["streamed"] == expected["streamed"]
    assert len(got["streamed"]) == 6 and got["streamed"][-1][1] == got["samples"][0].sequences[0].tokens.tolist()


def test_metadata_is_answered_without_the_workers(pool):
    assert [info.name for info in pool.model_infos()] == [M]
    assert pool.model_info(M).vocab_size == 2048
    assert pool.tokenizer(M).decode(pool.tokenizer(M).encode("cat says meow")) == "cat says meow"


def test_bad_input_is_an_engine_error(pool):
    with pytest.raises(EngineError, match="not served here"):
        pool.create_adapter("x", "no/such-model", LoraSpec(rank=4))
    with pytest.raises(EngineError, match="LoRA rank"):  # checked by the worker's engine, raised here
        pool.create_adapter("x", M, LoraSpec(rank=0))
    assert not pool.has_adapter("x")
    pool.create_adapter("x", M, LoraSpec(rank=4, seed=0))
    with pytest.raises(EngineError, match="already exists"):
        pool.create_adapter("x", M, LoraSpec(rank=4))
    with pytest.raises(EngineError, match="unknown adapter"):
        pool.optim_step("nope", HYPER)
    results = pool.forward_backward([ForwardBackwardJob("nope", DATA["a"], "cross_entropy"),
                                     ForwardBackwardJob("x", DATA["a"], "no_such_loss"),
                                     ForwardBackwardJob("x", DATA["a"], "cross_entropy")])
    assert "unknown adapter" in str(results[0]) and "unknown loss" in str(results[1])
    assert results[2].metrics["loss:sum"] > 0
    steps = pool.optim_steps([("nope", HYPER), ("x", AdamHyper(learning_rate=-1)), ("x", HYPER)])
    assert "unknown adapter" in str(steps[0]) and "learning_rate" in str(steps[1])
    assert steps[2]["grad_norm:mean"] > 0  # the bad ones did not stop it
    pool.create_adapter("z", M, LoraSpec(rank=4, seed=0))
    trained, stepped = pool.run_training([ForwardBackwardJob("z", DATA["b"], "cross_entropy")], [("x", HYPER)])
    assert trained[0].metrics["loss:sum"] > 0 and stepped[0] == {"grad_norm:mean": 0.0}  # x had no new gradient
    pool.remove_adapter("z")
    job = SampleJob(M, "nope", [1, 2])
    [(refused, exc)] = pool.submit_samples([job])
    assert refused is job and isinstance(exc, EngineError) and "unknown adapter" in str(exc)
    assert not pool.sampling
    with pytest.raises(EngineError, match="no such directory"):
        pool.load_state("y", "/nonexistent/checkpoint", optimizer=False)
    pool.remove_adapter("x")
    assert not pool.has_adapter("x")


def test_a_killed_worker_fails_its_requests_clearly(engine_hf_home):
    pool = start_pool([M], 2, torch_threads=1, hf_home=engine_hf_home)
    try:
        pool.create_adapter("a", M, LoraSpec(rank=4, seed=1))
        pool.create_adapter("b", M, LoraSpec(rank=4, seed=2))
        victim = pool.workers[1]
        assert pool.placement()["b"] == victim.name
        sampling = SampleJob(M, "b", [1, 2, 3], max_tokens=1000, stop_token_ids=[])
        assert pool.submit_samples([sampling]) == []
        os.kill(victim.pid, signal.SIGKILL)

        done = {id(job): result for job, result in pool.step_samples()}
        assert isinstance(done[id(sampling)], WorkerDied)
        assert "worker-1" in str(done[id(sampling)]) and "died (signal 9)" in str(done[id(sampling)])
        assert not pool.sampling
        # Its adapters' calls fail at once with the same story; the other worker carries on.
        results = pool.forward_backward([ForwardBackwardJob(name, DATA["a"], "cross_entropy") for name in "ab"])
        assert results[0].metrics["loss:sum"] > 0
        assert isinstance(results[1], WorkerDied) and "adapters it held are lost" in str(results[1])
        with pytest.raises(WorkerDied, match="worker-1"):
            pool.optim_step("b", HYPER)
        pool.create_adapter("c", M, LoraSpec(rank=4))  # new adapters go to the live worker
        assert pool.placement()["c"] == "worker-0"
        assert "error" in pool.stats()["workers"]["worker-1"]
        pool.remove_adapter("b")  # the dead worker's adapter can still be released
        assert not pool.has_adapter("b")
    finally:
        pool.close()


def test_work_for_a_base_model_goes_to_the_workers_that_hold_it(engine_hf_home, tmp_path):
    from tinkex.engine import builtin

    # A second base model: the built-in one's directory under its own name (same weights).
    other = str(builtin.materialize(builtin.hub_cache_dir(engine_hf_home)))
    with pytest.raises(ValueError, match="does not serve: no/such-model"):
        start_pool([M], 0, worker_models=[[M], ["no/such-model"]], hf_home=engine_hf_home)
    pool = start_pool([M, other], 0, worker_models=[[M], [other]], torch_threads=1, hf_home=engine_hf_home)
    try:
        for name in ("a", "b"):  # both on worker-0, the only holder, though worker-1 holds no adapter
            pool.create_adapter(name, M, LoraSpec(rank=4, seed=1))
        pool.save_state("a", tmp_path / "a", optimizer=False)
        pool.load_state("a2", tmp_path / "a", optimizer=False)
        assert set(pool.placement().values()) == {"worker-0"}
        pool.create_adapter("c", other, LoraSpec(rank=4, seed=1))
        assert pool.placement()["c"] == "worker-1"

        jobs = [SampleJob(base, None, [5, 17, 99], max_tokens=4, seed=9) for base in (M, other)]
        results = run_samples(pool, jobs)
        assert results[0].sequences[0].tokens.tolist() == results[1].sequences[0].tokens.tolist()
        workers = pool.stats()["workers"]
        assert set(workers["worker-0"]["base_models"]) == {M} and set(workers["worker-1"]["base_models"]) == {other}
        # The same seed on the same weights, held by different workers under different names.
        a, c = pool.forward_backward([ForwardBackwardJob(name, DATA["a"], "cross_entropy") for name in "ac"])
        assert a.metrics["loss:sum"] == pytest.approx(c.metrics["loss:sum"], rel=1e-6)
    finally:
        pool.close()
