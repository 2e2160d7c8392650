"""Futures: every asynchronous request gets one; the worker resolves it and long-polls wake up.

Results live in memory for fast polling and in the store so that they survive a restart.

- A request's pending row is committed before its id is handed out, so that after a crash every id
  a client holds answers 410 (resubmit), never 404. On the event loop the rows of all the requests
  created in one pass of the loop (a client's burst of concurrent sample calls) are written in one
  transaction by a callback that runs after them (`stored` waits for it); elsewhere (plain routes, in
  FastAPI's thread pool) a row is written at once. The work is queued meanwhile.
- The engine thread does not wait for the store: `resolve` hands the outcome to a recorder thread,
  which writes whatever has piled up in one transaction and only then publishes each outcome, so a
  result is never seen by a client before it is durable. A finished row is an upsert and a pending
  row an insert that yields to it, so the two may reach the store in either order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from tinkex.types import ForwardBackwardOutput, SampleResponse, WireModel

from .store import RequestRow, Store, utcnow

log = logging.getLogger("tinkex.server")

ResultKind = Literal["json", "forward_backward", "sample"]
_KEEP_FINISHED_SECONDS = 600.0  # finished futures stay in memory this long; the store keeps them for good


@dataclass
class Outcome:
    """How a request ended: a result, or an error with its category ("user" or "server")."""

    result: WireModel | None = None
    error: str | None = None
    category: str = "server"

    @property
    def kind(self) -> ResultKind:
        if isinstance(self.result, ForwardBackwardOutput):
            return "forward_backward"
        if isinstance(self.result, SampleResponse):
            return "sample"
        return "json"


@dataclass
class Future:
    request_id: str
    tenant: str
    request_type: str
    model_id: str | None = None  # training requests: their metrics go into the run's history
    seq_id: int | None = None
    outcome: Outcome | None = None
    finished_at: float | None = None
    waiters: list[asyncio.Event] = field(default_factory=list)
    created_at: datetime = field(default_factory=utcnow)
    stored: asyncio.Future | None = None  # while its pending row waits for the loop's write: see create


class FutureTable:
    def __init__(self, store: Store):
        self._store = store
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_sweep = time.monotonic()
        self._unstored: list[Future] = []  # created on the loop in this pass, pending row not yet written
        self._unrecorded: deque[tuple[Future, Outcome]] = deque()  # resolved, not yet in the store
        self._recording = threading.Condition(self._lock)
        self._closed = False
        self._recorder = threading.Thread(target=self._record_loop, name="tinkex-recorder", daemon=True)
        self._recorder.start()

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def close(self) -> None:
        """Record what is still queued, then stop the recorder."""
        with self._recording:
            self._closed = True
            self._recording.notify()
        self._recorder.join(timeout=30)

    def create(self, tenant: str, request_type: str, model_id: str | None = None,
               seq_id: int | None = None) -> Future:
        """A new request's future. Off the event loop its pending row is written before this returns;
        on it, the row is written with the others of this pass of the loop, and the route awaits
        `stored` before it answers."""
        future = Future(request_id=f"{_IDS.getrandbits(128):032x}", tenant=tenant, request_type=request_type,
                        model_id=model_id, seq_id=seq_id)
        with self._lock:
            self._futures[future.request_id] = future
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._store.insert_requests([_pending_row(future)])
            return future
        future.stored = loop.create_future()
        if not self._unstored:
            loop.call_soon(self._write_unstored)
        self._unstored.append(future)
        return future

    def _write_unstored(self) -> None:
        futures, self._unstored = self._unstored, []
        try:
            self._store.insert_requests([_pending_row(f) for f in futures])
        except Exception as exc:
            log.exception("could not record %d new requests", len(futures))
            for future in futures:
                future.stored.set_exception(exc)
                future.stored.exception()  # logged above; a route that awaits it still gets it raised
            return
        for future in futures:
            future.stored.set_result(None)

    async def stored(self, request_id: str) -> None:
        """Wait until the request's pending row is written; raises the store's error if it was not."""
        with self._lock:
            future = self._futures.get(request_id)
        if future is not None and future.stored is not None:
            await future.stored

    def resolve(self, future: Future, outcome: Outcome) -> None:
        """Called from any thread, once per future; returns at once (the recorder stores and publishes)."""
        self.resolve_many([(future, outcome)])

    def resolve_many(self, finished: list[tuple[Future, Outcome]]) -> None:
        if finished:
            with self._recording:
                self._unrecorded.extend(finished)
                self._recording.notify()

    def _record_loop(self) -> None:
        while True:
            with self._recording:
                while not self._unrecorded and not self._closed:
                    self._recording.wait()
                if not self._unrecorded:
                    return
                batch = list(self._unrecorded)
                self._unrecorded.clear()
            try:
                self._store.finish_requests([_finished_row(f, o) for f, o in batch],
                                            [row for f, o in batch if (row := _metric_row(f, o)) is not None])
            except Exception:  # the answers still go out; after a restart these requests answer 410
                log.exception("could not record %d finished requests", len(batch))
            for future, outcome in batch:
                self._publish(future, outcome)

    def _publish(self, future: Future, outcome: Outcome) -> None:
        with self._lock:
            future.outcome = outcome
            future.finished_at = time.monotonic()
            waiters, future.waiters = future.waiters, []
        if self._loop is not None:
            for waiter in waiters:
                self._loop.call_soon_threadsafe(waiter.set)

    def lookup(self, request_id: str, tenant: str) -> Future | None | Literal["lost"]:
        """The future, "lost" if it was in flight when the server stopped, or None if unknown."""
        with self._lock:
            future = self._futures.get(request_id)
        if future is not None:
            return future if future.tenant == tenant else None
        row = self._store.owned(RequestRow, request_id, tenant)
        if row is None:
            return None
        if row.status in ("lost", "pending"):
            return "lost"
        return Future(request_id, tenant, row.request_type, outcome=_outcome_from_row(row), finished_at=time.monotonic())

    async def wait(self, future: Future, timeout: float) -> bool:
        """Wait until the future has an outcome or the timeout passes; True if it finished."""
        event = asyncio.Event()
        with self._lock:
            if future.outcome is not None:
                return True
            future.waiters.append(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            with self._lock:
                if event in future.waiters:
                    future.waiters.remove(event)
        return future.outcome is not None

    def forget_old(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < 10:
            return
        self._last_sweep, cutoff = now, now - _KEEP_FINISHED_SECONDS
        with self._lock:
            stale = [key for key, f in self._futures.items() if f.finished_at is not None and f.finished_at < cutoff]
            for key in stale:
                del self._futures[key]


# Request ids need to be unique, not secret (every lookup is by tenant too): a private generator,
# seeded from the OS (again in a forked child), spares a system call per request.
_IDS = random.Random()
os.register_at_fork(after_in_child=_IDS.seed)


def _pending_row(future: Future) -> dict:
    return {"id": future.request_id, "tenant": future.tenant, "request_type": future.request_type,
            "status": "pending", "created_at": future.created_at}


def _finished_row(future: Future, outcome: Outcome) -> dict:
    return {**_pending_row(future), "status": "failed" if outcome.error is not None else "done",
            "result_kind": outcome.kind, "error": outcome.error,
            "result": None if outcome.result is None else outcome.result.model_dump_json(exclude_none=True).encode(),
            "category": outcome.category if outcome.error is not None else None}


def _metric_row(future: Future, outcome: Outcome) -> dict | None:
    """A training request's metrics, for its run's history (a MetricRow's values)."""
    metrics = getattr(outcome.result, "metrics", None)
    if not metrics or future.model_id is None:
        return None
    return {"training_run_id": future.model_id, "seq_id": future.seq_id or 0,
            "request_type": future.request_type, "metrics": metrics}


def _outcome_from_row(row: RequestRow) -> Outcome:
    if row.status == "failed":
        return Outcome(error=row.error, category=row.category or "server")
    model: type[WireModel] = {"forward_backward": ForwardBackwardOutput, "sample": SampleResponse}.get(
        row.result_kind or "json", _StoredJson)
    return Outcome(result=model.model_validate_json(row.result or b"{}"))


class _StoredJson(WireModel):
    """A finished JSON result read back from the store: its fields, whatever they were."""

    model_config = {"extra": "allow"}
