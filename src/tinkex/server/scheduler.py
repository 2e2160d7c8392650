"""The scheduler: per-model seq_id order, one engine worker thread, batching across models.

Requests of one model run strictly in seq_id order; one that arrives early (the first chunk of a
parallel forward_backward is sent last) waits until the gap is filled. Each turn of the worker takes,
from every model with ready work, either its leading run of forward_backward jobs or one other
request; all the forward_backward jobs of that turn, from every tenant, go to the engine as one batch,
in one call with all its optimizer steps (one round trip to an engine worker process). With engine
workers, a turn is sent while the previous one still runs, so a worker goes straight from one to the
next (it runs its calls in the order they came) while this thread answers the last.

Sampling is continuous: the engine keeps a running decode batch, and each turn ends with the sample
requests that arrived joining it and one decode step of every row. So a long generation never holds
up training for more than one token's time, and a new request never waits for a batch to finish.
When nothing is decoding, a burst of requests (a client's concurrent sample calls, which reach the
server a fraction of a millisecond apart) is let finish arriving before its first request starts --
until none has come for a quarter of a decode step (at most 2 ms), or for at most 20 ms -- so that
the burst shares one prefill and one decode batch instead of the first few running a step ahead.

Work that must happen on the engine thread but belongs to no model queue (freeing the adapters of a
finished session) goes through `call_soon`, run at the start of the next turn.

Backpressure: the requests accepted and not yet finished (queued, waiting for a seq_id gap, or
decoding) are bounded by `max_queued`. A submission over the bound is refused with `QueueFull`
before anything is recorded, so the client resubmits the same request and seq_id later. One
exception keeps the bound from deadlocking the seq_id order: the request that fills the gap a
model's early arrivals wait for is always admitted (the queue cannot drain without it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tinkex.engine.api import AdamHyper, EngineError, ForwardBackwardJob, Ready, SampleJob

from .futures import Future, FutureTable, Outcome

log = logging.getLogger("tinkex.server")
DEFAULT_MAX_QUEUED = 4096
RETRY_AFTER_SECONDS = 1.0  # what a refused client is told to wait; the queue drains in about that time
_KEEP_SEEN = 10_000  # seq_ids remembered per model (and sample keys overall) to dedupe retries
MAX_GATHER_GAP = 0.002  # seconds: a burst of sample requests has ended when none came for this long
MAX_GATHER = 0.02  # seconds: the longest the first request of a burst waits for the rest


@dataclass
class Work:
    future: Future | None = None  # set when the work is queued
    run: Callable[[], Outcome] | None = None  # everything but forward_backward, optim_step and sample
    forward_backward: ForwardBackwardJob | None = None
    optim_step: tuple[str, AdamHyper] | None = None  # (adapter id, hyperparameters)
    sample: SampleJob | None = None
    finish: Callable[[object], Outcome] | None = None  # turns an engine result into the outcome


@dataclass
class _ModelQueue:
    next_seq: int
    waiting: dict[int, Work] = field(default_factory=dict)
    ready: deque[Work] = field(default_factory=deque)
    seen: dict[int, str] = field(default_factory=dict)  # seq_id -> request_id, to dedupe retries


class SeqIdError(ValueError):
    """A seq_id that was already executed under a different request."""


class QueueFull(Exception):
    """The scheduler holds as many unfinished requests as it may; the client should retry later."""

    def __init__(self, queued: int, limit: int):
        super().__init__(f"the server is busy: {queued} requests are queued (the limit is {limit}); "
                         f"retry in {RETRY_AFTER_SECONDS:g} s")
        self.retry_after = RETRY_AFTER_SECONDS


class Scheduler:
    def __init__(self, engine, futures: FutureTable, prepare_sample: Callable[[SampleJob], None]):
        self._engine = engine
        self._futures = futures
        self._prepare_sample = prepare_sample  # loads a sampler adapter on the worker thread if needed
        self._models: dict[str, _ModelQueue] = {}
        self._samples: deque[Work] = deque()  # arrived, not yet given to the engine
        self._sampling: dict[int, Work] = {}  # id(SampleJob) -> its work, while the engine has it
        self._sample_seen: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._calls: deque[Callable[[], None]] = deque()
        self._training: tuple | None = None  # (reply, forward_backward works, step works) sent, not answered
        self._last_sample_at = 0.0  # when the newest sample request arrived (time.monotonic)
        self._step_seconds = 0.0  # a recent decode step's duration
        self.max_queued = DEFAULT_MAX_QUEUED  # unfinished requests admitted at once (None: no bound)
        self._claimed = 0  # rooms taken by requests between admission and submit
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="tinkex-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # ---- submission (event-loop side) ------------------------------------------------------------

    def open_model(self, model_id: str) -> None:
        with self._cond:
            self._models.setdefault(model_id, _ModelQueue(next_seq=0))

    def model_ids(self) -> list[str]:
        with self._cond:
            return list(self._models)

    def has_model(self, model_id: str) -> bool:
        with self._cond:
            return model_id in self._models

    def close_model(self, model_id: str) -> None:
        with self._cond:
            self._models.pop(model_id, None)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run fn on the engine thread at the start of the next turn (engine calls belong there)."""
        with self._cond:
            self._calls.append(fn)
            self._cond.notify()

    def release_models(self, model_ids: list[str], reason: str) -> None:
        """Free these models' adapters and queues on the engine thread; their queued requests fail with
        `reason`. Sample requests decoding from them fail too. For session ends and expiries."""
        def release() -> None:
            for model_id in model_ids:
                with self._cond:
                    queue = self._models.pop(model_id, None)
                for work in [*queue.waiting.values(), *queue.ready] if queue else []:
                    if work.future is not None:
                        self._futures.resolve(work.future, Outcome(error=reason, category="user"))
                if self._engine.has_adapter(model_id):
                    self._engine.remove_adapter(model_id)

        self.call_soon(release)

    def next_seq(self, model_id: str) -> int:
        """The next seq_id nobody has claimed: for old clients that send none."""
        with self._cond:
            queue = self._models[model_id]
            return max([queue.next_seq - 1, *queue.waiting, *queue.seen]) + 1

    def existing(self, model_id: str, seq_id: int) -> str | None:
        """The request_id already given to (model_id, seq_id), if any: retries get the same future."""
        with self._cond:
            queue = self._models.get(model_id)
            return queue.seen.get(seq_id) if queue else None

    def queued(self) -> int:
        """Requests admitted and not finished: queued, waiting for a seq_id gap, or decoding."""
        with self._cond:
            return self._queued()

    def _queued(self) -> int:
        return (len(self._samples) + len(self._sampling) + self._claimed
                + sum(len(q.waiting) + len(q.ready) for q in self._models.values()))

    @contextmanager
    def room(self, model_id: str | None = None, seq_id: int | None = None) -> Iterator[None]:
        """Hold room for one request while it is recorded and submitted, or raise QueueFull.

        Enter it before anything about the request is recorded (its future, its store rows); leave it
        after submit() or submit_sample(). `model_id`/`seq_id` name a training request: the one its
        model's queue is waiting for is admitted even over the bound.
        """
        with self._cond:
            queued = self._queued()
            if self.max_queued is not None and queued >= self.max_queued and not self._fills_gap(model_id, seq_id):
                raise QueueFull(queued, self.max_queued)
            self._claimed += 1
        try:
            yield
        finally:
            with self._cond:
                self._claimed -= 1

    def _fills_gap(self, model_id: str | None, seq_id: int | None) -> bool:
        queue = self._models.get(model_id) if model_id is not None else None
        return queue is not None and bool(queue.waiting) and seq_id == queue.next_seq

    def submit(self, model_id: str, seq_id: int, work: Work) -> None:
        with self._cond:
            queue = self._models[model_id]
            if seq_id < queue.next_seq or seq_id in queue.waiting:
                raise SeqIdError(f"seq_id {seq_id} of model {model_id} was already used")
            if work.future is not None:
                queue.seen[seq_id] = work.future.request_id
                if len(queue.seen) > _KEEP_SEEN:  # retries come within minutes, not 10k requests later
                    del queue.seen[next(iter(queue.seen))]  # the oldest
            queue.waiting[seq_id] = work
            while queue.next_seq in queue.waiting:
                queue.ready.append(queue.waiting.pop(queue.next_seq))
                queue.next_seq += 1
            self._cond.notify()

    def skip(self, model_id: str, seq_id: int) -> None:
        """Mark a rejected request's seq_id as done, so the requests after it are not held forever."""
        try:
            self.submit(model_id, seq_id, Work())
        except SeqIdError:
            pass

    def existing_sample(self, key: tuple[str, int]) -> str | None:
        with self._cond:
            return self._sample_seen.get(key)

    def submit_sample(self, key: tuple[str, int] | None, work: Work) -> None:
        with self._cond:
            if key is not None:
                self._sample_seen[key] = work.future.request_id
                if len(self._sample_seen) > _KEEP_SEEN * 10:
                    self._sample_seen.popitem(last=False)
            self._samples.append(work)
            self._last_sample_at = time.monotonic()
            self._cond.notify()

    # ---- the worker ----------------------------------------------------------------------------

    def _take_turn(self, *, wait: bool):
        with self._cond:
            while (wait and not self._stopped and not self._samples and not self._calls
                   and not any(q.ready for q in self._models.values())):
                self._cond.wait()
            if wait and self._samples:  # nothing is decoding or training: the burst may still be coming
                self._gather_samples()
            if self._stopped:
                return None
            calls = list(self._calls)
            self._calls.clear()
            batch: list[Work] = []
            others: list[Work] = []
            for queue in self._models.values():
                if not queue.ready:
                    continue
                if queue.ready[0].forward_backward is None:
                    others.append(queue.ready.popleft())
                    continue
                while queue.ready and queue.ready[0].forward_backward is not None:
                    batch.append(queue.ready.popleft())
            samples = list(self._samples)
            self._samples.clear()
            return calls, batch, others, samples

    def _gather_samples(self) -> None:
        """Wait (holding the lock's condition) while sample requests keep arriving; see the module
        docstring. Anything else that becomes ready ends the wait."""
        gap = min(MAX_GATHER_GAP, self._step_seconds / 4)
        deadline = time.monotonic() + MAX_GATHER
        while not self._stopped and not self._calls and not any(q.ready for q in self._models.values()):
            now = time.monotonic()
            quiet_for = now - self._last_sample_at
            if quiet_for >= gap or now >= deadline:
                return
            self._cond.wait(min(gap - quiet_for, deadline - now))

    def _loop(self) -> None:
        # Wait for work only when nothing is decoding or training; otherwise take what is ready.
        while (turn := self._take_turn(wait=not self._engine.sampling and self._training is None)) is not None:
            calls, batch, others, samples = turn
            for fn in calls:
                try:
                    fn()
                except Exception:
                    log.exception("engine-thread call failed")
            steps = [work for work in others if work.optim_step is not None]
            self._train(batch, steps)
            for work in others:
                if work.optim_step is None and work.future is not None:  # skipped seq_ids carry no future
                    self._resolve(work, work.run)
            if samples:
                self._admit_samples(samples)
            if self._engine.sampling:
                self._step_samples()
            self._futures.forget_old()
        self._train([], [])  # answer the turn still in flight

    def _admit_samples(self, samples: list[Work]) -> None:
        jobs = []
        for work in samples:
            try:
                self._prepare_sample(work.sample)
            except Exception as exc:
                self._futures.resolve(work.future, _failure(exc))
                continue
            self._sampling[id(work.sample)] = work
            jobs.append(work.sample)
        try:
            refused = self._engine.submit_samples(jobs)
        except Exception as exc:
            log.exception("sample admission failed")
            refused = [(job, exc) for job in jobs]
        for job, exc in refused:
            self._futures.resolve(self._sampling.pop(id(job)).future, _failure(exc))

    def _step_samples(self) -> None:
        started = time.monotonic()
        try:
            done = self._engine.step_samples()
        except Exception as exc:  # the engine contains its own faults; this is a last resort
            log.exception("decode step failed")
            done = [(work.sample, exc) for work in self._sampling.values()]
        self._step_seconds = time.monotonic() - started
        finished = []
        for job, result in done:
            work = self._sampling.pop(id(job), None)
            if work is not None:
                finished.append((work, result))
        self._resolve_all(finished)

    def _train(self, batch: list[Work], steps: list[Work]) -> None:
        """Send the turn's forward_backward jobs, as one batch, and its optimizer steps to the engine
        in one call, then answer the previous turn's. Engine workers run the new turn while the
        previous one's answers are handed out and the next turn is gathered, so they never wait for
        this thread between turns; the in-process engine has run a turn when it returns."""
        sent = None
        if batch or steps:
            try:
                reply = self._engine.submit_training([w.forward_backward for w in batch], [w.optim_step for w in steps])
                sent = (reply, batch, steps)
            except Exception as exc:
                self._fail_training(batch + steps, exc)
        previous, self._training = self._training, sent
        if previous is not None:
            self._answer_training(*previous)
        if sent is not None and isinstance(sent[0], Ready):
            self._training = None
            self._answer_training(*sent)

    def _answer_training(self, reply, batch: list[Work], steps: list[Work]) -> None:
        try:
            results, metrics = reply.result()
        except Exception as exc:
            self._fail_training(batch + steps, exc)
            return
        self._resolve_all([*zip(batch, results), *zip(steps, metrics)])

    def _fail_training(self, works: list[Work], exc: Exception) -> None:
        log.error("engine batch failed", exc_info=exc)
        failed = Outcome(error=f"internal error: {exc}", category="server")
        self._futures.resolve_many([(work.future, failed) for work in works])

    def _resolve(self, work: Work, compute: Callable[[], Outcome]) -> None:
        self._futures.resolve(work.future, _outcome(compute))

    def _resolve_all(self, finished: list[tuple[Work, object]]) -> None:
        """Answer many works from their engine results (or exceptions) with one hand-over to the
        recorder: a decode step can finish dozens of requests at once."""
        self._futures.resolve_many([
            (work.future, _failure(result) if isinstance(result, Exception) else _outcome(work.finish, result))
            for work, result in finished])


def _outcome(compute: Callable[..., Outcome], *args: object) -> Outcome:
    """What `compute(*args)` answers, or the failure it raised."""
    try:
        return compute(*args)
    except Exception as exc:
        return _failure(exc)


def _failure(exc: Exception) -> Outcome:
    if isinstance(exc, EngineError):
        return Outcome(error=str(exc), category="user")
    log.error("request failed", exc_info=exc)
    return Outcome(error=f"internal error: {type(exc).__name__}: {exc}", category="server")
