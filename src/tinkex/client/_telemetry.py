"""Telemetry: events queued in memory and sent in batches to `POST /api/v1/telemetry`.

A background task on the SDK loop flushes every 10 s, or at once when an error is logged. At most
100 events go in one POST; the queue holds at most 10,000 (more are dropped). Closing drains for up
to 30 s. `TINKER_TELEMETRY` other than 1/true/yes/on turns it all off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import threading
import traceback as tb
import uuid
from collections import deque
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from ..types._exceptions import APIError, APIStatusError, RequestFailedError
from ._constants import PROTOCOL_SDK_VERSION

if TYPE_CHECKING:
    from ._holder import Holder

logger = logging.getLogger("tinkex")

FLUSH_INTERVAL_S = 10.0
MAX_BATCH = 100
MAX_QUEUE = 10_000
DRAIN_TIMEOUT_S = 30.0
_process_uuid: tuple[int, str] | None = None


def telemetry_enabled() -> bool:
    return os.environ.get("TINKER_TELEMETRY", "1").strip().lower() in ("1", "true", "yes", "on")


def process_uuid() -> str:
    """A uuid per process, renewed after a fork."""
    global _process_uuid
    if _process_uuid is None or _process_uuid[0] != os.getpid():
        _process_uuid = (os.getpid(), str(uuid.uuid4()))
    return _process_uuid[1]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, RequestFailedError):
        return exc.category == "user"
    if isinstance(exc, APIStatusError):
        return 400 <= exc.status_code < 500 and exc.status_code != 408
    return False


class Telemetry:
    def __init__(self, holder: Holder):
        self._holder = holder
        self._queue: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._index = 0
        self._started = datetime.now(timezone.utc)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._sessionless_id = f"sessionless-{uuid.uuid4()}"
        self.sent_batches = 0

    # ---- producing events (any thread) -------------------------------------------------------

    def _add(self, event: str, severity: str, **fields: Any) -> None:
        with self._lock:
            if len(self._queue) >= MAX_QUEUE:
                return
            record = {"event": event, "event_id": str(uuid.uuid4()), "event_session_index": self._index,
                      "severity": severity, "timestamp": _now()}
            self._index += 1
            record.update({key: value for key, value in fields.items() if value is not None})
            self._queue.append(record)

    def session_start(self) -> None:
        self._add("SESSION_START", "INFO")

    def session_end(self) -> None:
        self._add("SESSION_END", "INFO", duration=str(datetime.now(timezone.utc) - self._started))

    def generic(self, name: str, data: dict[str, Any] | None = None, severity: str = "INFO") -> None:
        self._add("GENERIC_EVENT", severity, event_name=name, event_data=_jsonable(data or {}))

    def exception(self, exc: BaseException, *, where: str | None = None) -> None:
        """Record an exception that reached the user: a user error, or an unhandled one."""
        if is_user_error(exc):
            data: dict[str, Any] = {"error_type": type(exc).__name__, "message": str(exc)}
            if isinstance(exc, APIStatusError):
                data["status_code"] = exc.status_code
                data["body"] = exc.body
            if where:
                data["where"] = where
            self.generic("user_error", data, severity="WARNING")
        else:
            self._add("UNHANDLED_EXCEPTION", "ERROR", error_type=type(exc).__name__, error_message=str(exc),
                      traceback="".join(tb.format_exception(exc)) if exc.__traceback__ else None)
        self.trigger()

    # ---- sending (the SDK loop) --------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def trigger(self) -> None:
        wake, task = self._wake, self._task
        if wake is None or task is None:
            return
        try:
            task.get_loop().call_soon_threadsafe(wake.set)
        except RuntimeError:
            pass

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), FLUSH_INTERVAL_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        while True:
            with self._lock:
                batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            if not batch:
                return
            body = {"events": batch, "platform": platform.system(), "sdk_version": PROTOCOL_SDK_VERSION,
                    "session_id": self._holder.session_id or self._sessionless_id, "process_uuid": process_uuid()}
            try:
                await self._holder.transport.request("POST", "/api/v1/telemetry", purpose="telemetry", json=body,
                                                     timeout=5.0)
                self.sent_batches += 1
            except APIError as exc:
                logger.warning("dropped a telemetry batch of %d events: %s", len(batch), exc)
            except Exception as exc:  # never let telemetry break the SDK
                logger.warning("dropped a telemetry batch: %s", exc)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        try:
            await asyncio.wait_for(self.flush(), DRAIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            logger.warning("telemetry drain timed out")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, timedelta):
        return value.total_seconds()
    return str(value)
