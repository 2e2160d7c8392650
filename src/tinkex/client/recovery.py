"""Recovery (opt-in): carry a training loop over a failed or lost training run.

A run can be lost while a loop is running: the server restarted (its model is no longer loaded:
submits answer 404 "...is not loaded...", in-flight futures 410), a request failed as a server
error, or the server flags the run `corrupted`. Recovery then

1. picks a checkpoint: the newest `training` checkpoint of the run (via `RestClient.list_checkpoints`),
   or, if the run has none yet, the checkpoint it was itself recovered from; or the one you name;
2. starts a new training client from it with `create_training_client_from_state_with_optimizer`
   (weights and Adam state; `restore_optimizer=False` for weights only);
3. hands it back, with the training step stored in the checkpoint, so the loop continues there.

Attempts, backoff between them and callbacks come from a `RecoveryPolicy`. Every step is a
telemetry event (`tinkex.recovery.*`, see `telemetry`), a log line on the `tinkex` logger and the
`tinkex_recoveries_total` metric.

The simplest use is `run_with_recovery`, which also writes the checkpoints:

    def step(trainer, i):
        fwd = trainer.forward_backward(batches[i], "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=1e-4)).result()
        fwd.result()

    trainer = run_with_recovery(service, trainer, step, num_steps=1000, checkpoint_every=50,
                                policy=RecoveryPolicy(max_attempts=5))

A loop of your own uses `Recovery` directly:

    recovery = Recovery(service, RecoveryPolicy())
    while i < n:
        try:
            ...
        except Exception as exc:
            if not recovery.should_recover(exc):
                raise
            recovered = recovery.recover(trainer, exc)
            trainer, i = recovered.client, recovered.step or 0
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..types import Checkpoint
from ..types._exceptions import (
    APIConnectionError,
    APIStatusError,
    NotFoundError,
    RequestFailedError,
    TinkerError,
)
from . import metrics as _metrics
from . import telemetry as _telemetry
from ._futures import RetryableException

if TYPE_CHECKING:
    from .rest_client import RestClient
    from .service_client import ServiceClient
    from .training_client import TrainingClient

logger = logging.getLogger("tinkex")
STEP_METADATA_KEY = "tinkex_step"


class RunCorrupted(TinkerError):
    """The server reports the training run as corrupted."""

    def __init__(self, run_id: str):
        super().__init__(f"the server reports training run {run_id} as corrupted")
        self.run_id = run_id


class NoCheckpointError(TinkerError):
    """A run needs recovering but has no checkpoint to recover from."""


class RecoveryFailed(TinkerError):
    """Every recovery attempt failed (the last error is the `__cause__`)."""

    def __init__(self, run_id: str, attempts: int, last_error: BaseException | None):
        super().__init__(f"could not recover training run {run_id} after {attempts} attempt(s): "
                         f"{type(last_error).__name__ if last_error else 'no error'}: {last_error}")
        self.run_id = run_id
        self.attempts = attempts
        self.last_error = last_error


@dataclass(frozen=True)
class Recovered:
    """A successful recovery: the new client, where it started from, and the step to continue at."""

    client: TrainingClient
    checkpoint: str
    step: int | None  # from the checkpoint's user_metadata["tinkex_step"], when it has one
    previous_run_id: str
    attempts: int
    error: BaseException | None = None  # what triggered it


@dataclass
class RecoveryPolicy:
    """How to recover. `checkpoint` is "latest" or a tinker:// path of a training checkpoint."""

    max_attempts: int = 3  # tries per recovery
    backoff_s: float = 2.0  # before attempt n+1: min(backoff_s * 2**(n-1), max_backoff_s)
    max_backoff_s: float = 60.0
    checkpoint: Literal["latest"] | str = "latest"
    restore_optimizer: bool = True
    max_recoveries: int = 5  # per run_with_recovery call, so a step that always kills the server stops
    attempt_timeout_s: float = 600.0  # for creating the new training client
    poll_interval_s: float | None = None  # run_with_recovery: also poll the run's `corrupted` flag this often
    on_recovery: Callable[[Recovered], Any] | None = None
    on_failure: Callable[[str, BaseException | None], Any] | None = None
    recover_on: Callable[[BaseException], bool] | None = None  # replaces `is_recoverable`
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("backoff times cannot be negative")
        if self.checkpoint != "latest" and not str(self.checkpoint).startswith("tinker://"):
            raise ValueError('checkpoint must be "latest" or a tinker:// path')

    def delay(self, attempt: int) -> float:
        return min(self.backoff_s * 2.0 ** (attempt - 1), self.max_backoff_s)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 8:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def is_recoverable(exc: BaseException) -> bool:
    """Does this error mean the training run is lost or broken (rather than a mistake in the call)?

    Yes for: a promise that expired (410, e.g. in flight across a server restart); a 404 saying the
    model is not loaded; a request that failed with category "server"; a 5xx or a connection error
    left after the SDK's own retries; `RunCorrupted`. No for user errors (bad input, 4xx).
    """
    for item in _chain(exc):
        if isinstance(item, (RetryableException, RunCorrupted)):
            return True
        if isinstance(item, NotFoundError):
            return "not loaded" in str(item)
        if isinstance(item, RequestFailedError):
            return item.category != "user"
        if isinstance(item, APIStatusError):
            return item.status_code >= 500 or item.status_code == 410
        if isinstance(item, APIConnectionError):
            return True
    return False


class Recovery:
    """Recovers training runs for one ServiceClient, under one policy."""

    def __init__(self, service_client: ServiceClient, policy: RecoveryPolicy | None = None, *,
                 rest_client: RestClient | None = None):
        self.service_client = service_client
        self.policy = policy or RecoveryPolicy()
        self._rest = rest_client
        # new run id -> (run it replaced, checkpoint it started from, step): the fallback when a
        # recovered run is lost before its first checkpoint of its own
        self._origin: dict[str, tuple[str, str, int | None]] = {}
        self.history: list[Recovered] = []

    @property
    def rest(self) -> RestClient:
        if self._rest is None:
            self._rest = self.service_client.create_rest_client()
        return self._rest

    def should_recover(self, exc: BaseException) -> bool:
        return (self.policy.recover_on or is_recoverable)(exc)

    # ---- choosing the checkpoint ---------------------------------------------------------------

    def latest_checkpoint(self, run_id: str) -> tuple[str, int | None] | None:
        """(tinker path, step) of the newest training checkpoint of `run_id` or of the runs it came from."""
        listed = self.rest.list_checkpoints(run_id).result(60)
        training = [c for c in listed.checkpoints if c.checkpoint_type == "training"]
        if training:
            newest = max(training, key=lambda c: (c.time, c.tinker_path))
            return newest.tinker_path, _step_of(newest)
        if run_id in self._origin:
            _, path, step = self._origin[run_id]
            return path, step
        return None

    def _select(self, run_id: str, checkpoint: str | None) -> tuple[str, int | None]:
        chosen = checkpoint or (self.policy.checkpoint if self.policy.checkpoint != "latest" else None)
        if chosen is not None:
            return chosen, self._step_of_path(chosen)
        latest = self.latest_checkpoint(run_id)
        if latest is None:
            raise NoCheckpointError(f"training run {run_id} has no training checkpoint (save_state) to recover from")
        return latest

    def _step_of_path(self, path: str) -> int | None:
        for _, origin_path, step in self._origin.values():
            if origin_path == path:
                return step
        try:
            run_id = path[len("tinker://"):].split("/", 1)[0]
            for item in self.rest.list_checkpoints(run_id).result(60).checkpoints:
                if item.tinker_path == path:
                    return _step_of(item)
        except Exception:
            logger.debug("could not read the step of %s", path, exc_info=True)
        return None

    # ---- recovering ----------------------------------------------------------------------------

    def recover(self, failed: TrainingClient | str, error: BaseException | None = None, *,
                checkpoint: str | None = None) -> Recovered:
        """A new training client for the lost run `failed` (a TrainingClient or a run id).

        Raises NoCheckpointError when there is nothing to recover from, RecoveryFailed when every
        attempt failed.
        """
        policy = self.policy
        run_id = failed if isinstance(failed, str) else failed.model_id
        why = f"{type(error).__name__}: {error}" if error is not None else "requested"
        logger.warning("training run %s was lost (%s); recovering from a checkpoint", run_id, why)
        _telemetry.emit(_telemetry.RECOVERY_DETECTED, level=logging.WARNING, run_id=run_id,
                        error_type=type(error).__name__ if error is not None else None, error=str(error or ""))
        last_error: BaseException | None = None
        for attempt in range(1, policy.max_attempts + 1):
            try:
                with _telemetry.span(_telemetry.RECOVERY_ATTEMPT, level=logging.INFO, run_id=run_id,
                                     attempt=attempt) as attrs:
                    path, step = self._select(run_id, checkpoint)
                    attrs.update(checkpoint=path, step=step)
                    _telemetry.emit(_telemetry.RECOVERY_CHECKPOINT_SELECTED, level=logging.INFO, run_id=run_id,
                                    attempt=attempt, checkpoint=path, step=step)
                    if policy.restore_optimizer:
                        future = self.service_client.create_training_client_from_state_with_optimizer(path)
                    else:
                        future = self.service_client.create_training_client_from_state(path)
                    client = future.result(policy.attempt_timeout_s)
                    attrs["new_run_id"] = client.model_id
                    _telemetry.emit(_telemetry.RECOVERY_CLIENT_CREATED, level=logging.INFO, run_id=run_id,
                                    attempt=attempt, checkpoint=path, new_run_id=client.model_id)
            except NoCheckpointError as exc:
                last_error = exc
                _metrics.REGISTRY.increment("tinkex_recoveries_total", outcome="no_checkpoint")
                break
            except Exception as exc:
                last_error = exc
                _metrics.REGISTRY.increment("tinkex_recoveries_total", outcome="failed_attempt")
                _telemetry.emit(_telemetry.RECOVERY_FAILED, level=logging.WARNING, run_id=run_id, attempt=attempt,
                                error=f"{type(exc).__name__}: {exc}")
                if attempt < policy.max_attempts:
                    delay = policy.delay(attempt)
                    logger.warning("recovery attempt %d/%d for %s failed (%s: %s); retrying in %.1f s", attempt,
                                   policy.max_attempts, run_id, type(exc).__name__, exc, delay)
                    policy.sleep(delay)
                continue
            self._origin[client.model_id] = (run_id, path, step)
            recovered = Recovered(client=client, checkpoint=path, step=step, previous_run_id=run_id,
                                  attempts=attempt, error=error)
            self.history.append(recovered)
            _metrics.REGISTRY.increment("tinkex_recoveries_total", outcome="recovered")
            _telemetry.emit(_telemetry.RECOVERY_COMPLETED, level=logging.INFO, run_id=run_id,
                            new_run_id=client.model_id, checkpoint=path, step=step, attempts=attempt)
            logger.warning("recovered training run %s as %s from %s%s", run_id, client.model_id, path,
                           f" (step {step})" if step is not None else "")
            _call(policy.on_recovery, recovered)
            return recovered
        _metrics.REGISTRY.increment("tinkex_recoveries_total", outcome="exhausted")
        _telemetry.emit(_telemetry.RECOVERY_EXHAUSTED, level=logging.ERROR, run_id=run_id,
                        error=f"{type(last_error).__name__}: {last_error}")
        logger.error("could not recover training run %s: %s", run_id, last_error)
        _call(policy.on_failure, run_id, last_error)
        if isinstance(last_error, NoCheckpointError):
            raise last_error
        raise RecoveryFailed(run_id, policy.max_attempts, last_error) from last_error


def _step_of(checkpoint: Checkpoint) -> int | None:
    value = (checkpoint.user_metadata or {}).get(STEP_METADATA_KEY)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _call(callback: Callable[..., Any] | None, *args: Any) -> None:
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:  # a broken callback is reported, and recovery goes on
        logger.exception("recovery callback %r failed", callback)


class RunMonitor:
    """Polls a training run's `corrupted` flag in a background thread; `check()` raises RunCorrupted."""

    def __init__(self, rest_client: RestClient, run_id: str, interval_s: float):
        self.rest = rest_client
        self.run_id = run_id
        self.interval_s = interval_s
        self._corrupted: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0

    def start(self) -> RunMonitor:
        self._thread = threading.Thread(target=self._run, name="tinkex-run-monitor", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            run_id = self.run_id
            try:
                run = self.rest.get_training_run(run_id).result(60)
                self.polls += 1
            except Exception as exc:
                _telemetry.emit("tinkex.recovery.poll_error", run_id=run_id, error=f"{type(exc).__name__}: {exc}")
                continue
            if run.corrupted and run_id == self.run_id:
                self._corrupted = run_id

    def follow(self, run_id: str) -> None:
        """Watch another run from now on (the one a recovery created)."""
        self.run_id = run_id
        self._corrupted = None

    def check(self) -> None:
        if self._corrupted is not None and self._corrupted == self.run_id:
            raise RunCorrupted(self._corrupted)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def save_step_checkpoint(client: TrainingClient, step: int, name: str, ttl_seconds: int | None = None) -> str:
    """save_state with the step in its user_metadata (what recovery reads to know where to resume)."""
    return client.save_state(name, ttl_seconds=ttl_seconds, overwrite=True,
                             user_metadata={STEP_METADATA_KEY: str(step)}).result().path


def run_with_recovery(service_client: ServiceClient, training_client: TrainingClient,
                      step_fn: Callable[[TrainingClient, int], Any], *, num_steps: int, start_step: int = 0,
                      checkpoint_every: int | None = 10, checkpoint_name: str = "recovery-{step:06d}",
                      ttl_seconds: int | None = None, policy: RecoveryPolicy | None = None) -> TrainingClient:
    """Run `step_fn(client, step)` for steps `start_step .. num_steps-1`, recovering lost runs.

    Every `checkpoint_every` steps (and before the first one) it saves the state as
    `checkpoint_name` with the step number, so a recovery resumes at the last saved step with the
    optimizer state of that moment; the steps after it are run again. `step_fn` gets the current
    client every time: do not keep a client (or a sampling client made from it) across steps.
    Returns the client the run ended with (a new one if it was recovered).
    """
    policy = policy or RecoveryPolicy()
    recovery = Recovery(service_client, policy)
    client = training_client
    monitor = RunMonitor(recovery.rest, client.model_id, policy.poll_interval_s).start() \
        if policy.poll_interval_s else None
    recoveries = 0
    step = start_step
    try:
        if checkpoint_every and policy.checkpoint == "latest":
            _save(client, step, checkpoint_name, ttl_seconds)
        while step < num_steps:
            try:
                if monitor is not None:
                    monitor.check()
                step_fn(client, step)
                step += 1
                if checkpoint_every and step % checkpoint_every == 0 and step < num_steps:
                    _save(client, step, checkpoint_name, ttl_seconds)
            except Exception as exc:
                if not recovery.should_recover(exc) or recoveries >= policy.max_recoveries:
                    raise
                recoveries += 1
                recovered = recovery.recover(client, exc)
                client = recovered.client
                step = recovered.step if recovered.step is not None else start_step
                if monitor is not None:
                    monitor.follow(client.model_id)
        return client
    finally:
        if monitor is not None:
            monitor.stop()


def _save(client: TrainingClient, step: int, name: str, ttl_seconds: int | None) -> str:
    return save_step_checkpoint(client, step, name.format(step=step), ttl_seconds)
