"""Recovery against a real `tinkex serve` process: killed and restarted mid-run, a corrupted flag,
exhausted attempts, and the classification of errors."""

from __future__ import annotations

import sqlite3
import threading
import time

import httpx
import pytest

import tinkex
from tinkex import types
from tinkex.client import metrics, telemetry
from tinkex.client._futures import RetryableException
from tinkex.client.recovery import (
    NoCheckpointError,
    Recovery,
    RecoveryFailed,
    RecoveryPolicy,
    RunCorrupted,
    is_recoverable,
    run_with_recovery,
)
from tinkex.server.embedded import free_port

from ..conftest import ALICE, start_server
from .conftest import MODEL, sft_datum

TOKENS = list(range(10, 60))


@pytest.fixture(scope="module")
def own_server(tmp_path_factory, hf_home):
    """A server on a fixed port, so that a restart comes back at the same URL."""
    proc = start_server(tmp_path_factory.mktemp("recovery-server"), "--port", str(free_port()))
    yield proc
    proc.stop()


@pytest.fixture
def service(own_server):
    client = tinkex.ServiceClient(base_url=own_server.base_url, api_key=ALICE)
    yield client
    try:
        client.close().result(30)
    except Exception:
        pass


def _step(trainer: tinkex.TrainingClient, losses: list[float]) -> None:
    fwd = trainer.forward_backward([sft_datum(TOKENS)] * 4, "cross_entropy")
    optim = trainer.optim_step(types.AdamParams(learning_rate=2e-2))
    losses.append(fwd.result(120).metrics["loss:sum"])
    optim.result(120)


def test_a_run_survives_a_server_killed_and_restarted_mid_step(own_server, service):
    trainer = service.create_lora_training_client(MODEL, rank=8, seed=0).result(60)
    first_run = trainer.model_id
    calls: list[tuple[int, str]] = []
    losses: list[float] = []
    recovered = []
    killed = threading.Event()

    def step(client: tinkex.TrainingClient, i: int) -> None:
        calls.append((i, client.model_id))
        if i == 5 and not killed.is_set():
            killed.set()
            fwd = client.forward_backward([sft_datum(TOKENS)] * 16, "cross_entropy")  # in flight...
            own_server.stop(kill=True)  # ... when the server dies (kill -9)
            own_server.restart()  # same data dir, same port
            fwd.result(120)  # lost with the process: 410, or the model is gone: 404
            client.optim_step(types.AdamParams(learning_rate=2e-2)).result(120)
            raise AssertionError("the step should not survive the restart")
        _step(client, losses)

    policy = RecoveryPolicy(max_attempts=3, backoff_s=0.5, on_recovery=recovered.append)
    with telemetry.capture("tinkex.recovery") as events:
        before = metrics.REGISTRY.value("tinkex_recoveries_total", outcome="recovered") or 0
        final = run_with_recovery(service, trainer, step, num_steps=8, checkpoint_every=3, policy=policy)

    # it recovered once, from the step-3 checkpoint (the latest before the kill), with its optimizer state
    assert len(recovered) == 1
    assert recovered[0].previous_run_id == first_run and recovered[0].step == 3
    assert recovered[0].checkpoint == f"tinker://{first_run}/weights/recovery-000003"
    assert is_recoverable(recovered[0].error)
    assert final.model_id != first_run
    # the loop went 0..5, then again from 3 on the new run, to the end
    assert [i for i, _ in calls] == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]
    assert {run for i, run in calls[6:]} == {final.model_id}
    # and it kept learning across the restart
    assert losses[-1] < losses[0] * 0.8
    # the new run is a real, usable run: it has its own checkpoint and trains on
    rest = service.create_rest_client()
    names = [c.checkpoint_id for c in rest.list_checkpoints(final.model_id).result(30).checkpoints]
    assert names == ["weights/recovery-000006"]
    final.forward_backward([sft_datum(TOKENS)], "cross_entropy").result(60)
    # every step of it was visible
    names = [e.name for e in events]
    for expected in (telemetry.RECOVERY_DETECTED, telemetry.RECOVERY_CHECKPOINT_SELECTED,
                     telemetry.RECOVERY_CLIENT_CREATED, telemetry.RECOVERY_ATTEMPT, telemetry.RECOVERY_COMPLETED):
        assert expected in names
    completed = next(e for e in events if e.name == telemetry.RECOVERY_COMPLETED)
    assert completed.attributes["new_run_id"] == final.model_id and completed.attributes["step"] == 3
    assert metrics.REGISTRY.value("tinkex_recoveries_total", outcome="recovered") == before + 1


def test_a_run_the_server_flags_as_corrupted_is_recovered(own_server, service):
    trainer = service.create_lora_training_client(MODEL, rank=8, seed=1).result(60)
    losses: list[float] = []
    seen: list[tuple[int, str]] = []
    recovered = []

    def step(client: tinkex.TrainingClient, i: int) -> None:
        seen.append((i, client.model_id))
        _step(client, losses)
        if i == 2 and client.model_id == trainer.model_id:
            with sqlite3.connect(own_server.data_dir / "tinkex.db") as db:  # the server's own store says so
                db.execute("UPDATE training_runs SET corrupted = 1 WHERE id = ?", (client.model_id,))
            deadline = time.monotonic() + 30
            rest = service.create_rest_client()
            while not rest.get_training_run(client.model_id).result(30).corrupted:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            time.sleep(0.6)  # a few monitor polls

    policy = RecoveryPolicy(poll_interval_s=0.1, backoff_s=0.1, on_recovery=recovered.append)
    final = run_with_recovery(service, trainer, step, num_steps=5, checkpoint_every=2, policy=policy)
    assert len(recovered) == 1 and isinstance(recovered[0].error, RunCorrupted)
    assert recovered[0].step == 2 and final.model_id != trainer.model_id
    assert [i for i, _ in seen] == [0, 1, 2, 2, 3, 4]


def test_attempts_backoff_and_callbacks_when_recovery_cannot_succeed(service):
    trainer = service.create_lora_training_client(MODEL, rank=4, seed=2).result(60)
    sleeps: list[float] = []
    failures: list[tuple[str, BaseException | None]] = []
    policy = RecoveryPolicy(max_attempts=3, backoff_s=0.25, max_backoff_s=0.4, sleep=sleeps.append,
                            checkpoint=f"tinker://{trainer.model_id}/weights/never-saved",
                            on_failure=lambda run, err: failures.append((run, err)),
                            on_recovery=lambda _r: 1 / 0)
    with telemetry.capture("tinkex.recovery") as events:
        with pytest.raises(RecoveryFailed) as caught:
            Recovery(service, policy).recover(trainer, RetryableException("lost"))
    assert caught.value.attempts == 3 and isinstance(caught.value.last_error, types.NotFoundError)
    assert sleeps == [0.25, 0.4]  # exponential, capped; no sleep after the last attempt
    assert failures == [(trainer.model_id, caught.value.last_error)]
    names = [e.name for e in events]
    assert names.count(telemetry.RECOVERY_FAILED) == 3 and names[-1] == telemetry.RECOVERY_EXHAUSTED


def test_no_checkpoint_means_no_recovery_and_a_clear_error(service):
    trainer = service.create_lora_training_client(MODEL, rank=4, seed=3).result(60)
    with pytest.raises(NoCheckpointError, match="no training checkpoint"):
        Recovery(service, RecoveryPolicy(sleep=lambda _s: None)).recover(trainer)


def test_a_callback_error_does_not_undo_a_recovery(service, caplog):
    trainer = service.create_lora_training_client(MODEL, rank=4, seed=4).result(60)
    path = trainer.save_state("cb").result(60).path
    recovery = Recovery(service, RecoveryPolicy(on_recovery=lambda _r: 1 / 0, restore_optimizer=False))
    recovered = recovery.recover(trainer.model_id)
    assert recovered.checkpoint == path and recovered.step is None and recovery.history == [recovered]
    assert "recovery callback" in caplog.text and "ZeroDivisionError" in caplog.text


def test_what_counts_as_recoverable():
    request = httpx.Request("POST", "http://x/api/v1/forward_backward")

    def status(code: int, detail: str) -> types.APIStatusError:
        return _status_error(code, detail, httpx.Response(code, json={"detail": detail}, request=request))

    assert is_recoverable(RetryableException("Promise expired"))
    assert is_recoverable(status(404, "model 'x' is not loaded (the server restarted or it was unloaded)"))
    assert not is_recoverable(status(404, "checkpoint 'x' not found"))
    assert is_recoverable(status(500, "boom")) and is_recoverable(status(503, "busy"))
    assert not is_recoverable(status(400, "bad input"))
    assert is_recoverable(types.RequestFailedError("engine crashed", "r1", "server"))
    assert not is_recoverable(types.RequestFailedError("bad loss input", "r1", "user"))
    assert is_recoverable(types.APIConnectionError(request=request))
    assert is_recoverable(RunCorrupted("run"))
    wrapped = RuntimeError("this TrainingClient can no longer be used")
    wrapped.__cause__ = RetryableException("lost")
    assert is_recoverable(wrapped)
    assert not is_recoverable(ValueError("mine"))
    with pytest.raises(ValueError):
        RecoveryPolicy(checkpoint="weights/x")


def _status_error(code: int, detail: str, response: httpx.Response) -> types.APIStatusError:
    from tinkex.types._exceptions import status_error_class

    return status_error_class(code)(f"Error code: {code} - {detail}", response=response, body={"detail": detail})
