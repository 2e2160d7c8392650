"""Client-side telemetry events: requests, retries, queue-state changes, recovery and custom losses.

This is separate from `_telemetry` (the batches of events the SDK reports to the server's
`/api/v1/telemetry`, as the official SDK does). These events stay in the user's process. Each one
goes to:

- Python's logging, on the `tinkex.telemetry` logger: routine events (one per HTTP attempt, per
  regularizer term...) at DEBUG, notable ones (retries, recoveries, queue pauses) at INFO or
  WARNING. The record carries the event as `record.tinkex_event` and its attributes as
  `record.tinkex_attributes`, for structured handlers;
- the handlers registered with `subscribe(handler)`, called synchronously with an `Event` (a
  handler that raises is logged, never propagated);
- OpenTelemetry, when `opentelemetry-api` is installed and `TINKEX_OTEL` is not 0/false/off:
  `span()` opens a real span (HTTP calls, recovery attempts, custom losses), a point event is added
  to the current span, and HTTP requests carry the W3C `traceparent` header of the active span.
  Without a configured tracer provider the OpenTelemetry API makes all of this a no-op.

    from tinkex.client import telemetry
    with telemetry.capture() as events:
        ...
    print([e.name for e in events])
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("tinkex.telemetry")

# Event names, for handlers that filter.
HTTP_REQUEST = "tinkex.http.request"
HTTP_RETRY = "tinkex.http.retry"
QUEUE_STATE_CHANGE = "tinkex.queue.state_change"
RATE_LIMIT_BACKOFF = "tinkex.rate_limit.backoff"
RECOVERY_DETECTED = "tinkex.recovery.detected"
RECOVERY_ATTEMPT = "tinkex.recovery.attempt"
RECOVERY_CHECKPOINT_SELECTED = "tinkex.recovery.checkpoint_selected"
RECOVERY_CLIENT_CREATED = "tinkex.recovery.client_created"
RECOVERY_COMPLETED = "tinkex.recovery.completed"
RECOVERY_FAILED = "tinkex.recovery.failed"
RECOVERY_EXHAUSTED = "tinkex.recovery.exhausted"
CUSTOM_LOSS = "tinkex.custom_loss"
FORWARD_BACKWARD_CUSTOM = "tinkex.forward_backward_custom"
REGULARIZER = "tinkex.regularizer.compute"
DOWNLOAD = "tinkex.download"


@dataclass(frozen=True)
class Event:
    """One telemetry event. `duration_s` is set for events that close a span."""

    name: str
    attributes: Mapping[str, Any]
    timestamp: float = field(default_factory=time.time)
    duration_s: float | None = None
    level: int = logging.DEBUG
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "attributes": dict(self.attributes), "timestamp": self.timestamp,
                "duration_s": self.duration_s, "level": logging.getLevelName(self.level), "error": self.error}


Handler = Callable[[Event], None]


class Listeners:
    """Callbacks added and removed from any thread; notifying iterates a snapshot and takes no lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: tuple[Callable[[Any], None], ...] = ()

    def add(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        with self._lock:
            self._callbacks = (*self._callbacks, callback)
        return lambda: self.remove(callback)

    def remove(self, callback: Callable[[Any], None]) -> None:
        with self._lock:
            remaining = list(self._callbacks)
            if callback in remaining:
                remaining.remove(callback)
            self._callbacks = tuple(remaining)

    def __iter__(self):
        return iter(self._callbacks)

    def __bool__(self) -> bool:
        return bool(self._callbacks)


_handlers = Listeners()


def subscribe(handler: Handler) -> Callable[[], None]:
    """Call `handler(event)` for every event from now on; returns a function that unsubscribes."""
    return _handlers.add(handler)


def unsubscribe(handler: Handler) -> None:
    _handlers.remove(handler)


@contextlib.contextmanager
def capture(prefix: str = "") -> Iterator[list[Event]]:
    """Collect the events (whose name starts with `prefix`) emitted inside the block."""
    events: list[Event] = []
    events_lock = threading.Lock()

    def handler(event: Event) -> None:
        if event.name.startswith(prefix):
            with events_lock:
                events.append(event)

    remove = subscribe(handler)
    try:
        yield events
    finally:
        remove()


def _dispatch(event: Event) -> None:
    if logger.isEnabledFor(event.level):
        shown = " ".join(f"{key}={value}" for key, value in event.attributes.items() if value is not None)
        timing = f" ({event.duration_s * 1000:.1f} ms)" if event.duration_s is not None else ""
        error = f" error={event.error}" if event.error else ""
        logger.log(event.level, "%s%s %s%s", event.name, timing, shown, error,
                   extra={"tinkex_event": event.name, "tinkex_attributes": dict(event.attributes)})
    for handler in _handlers:
        try:
            handler(event)
        except Exception:
            logger.exception("telemetry handler %r failed", handler)


def emit(name: str, /, *, level: int = logging.DEBUG, duration_s: float | None = None, error: str | None = None,
         **attributes: Any) -> Event:
    """Emit a point event (also added to the current OpenTelemetry span, if one is recording)."""
    event = Event(name=name, attributes=attributes, duration_s=duration_s, level=level, error=error)
    _dispatch(event)
    otel = _otel()
    if otel is not None:
        current = otel.get_current_span()
        if current.is_recording():
            current.add_event(name, _otel_attributes(attributes))
    return event


def active() -> bool:
    """Whether anything listens: a subscriber, an enabled logger, or OpenTelemetry."""
    return bool(_handlers) or logger.isEnabledFor(logging.DEBUG) or _otel() is not None


@contextlib.contextmanager
def span(name: str, /, *, level: int = logging.DEBUG, error_level: int = logging.WARNING,
         **attributes: Any) -> Iterator[MutableMapping[str, Any]]:
    """Time a block; on exit emit `name` with its duration (and the error, if it raised).

    Yields a dict: attributes added to it inside the block are part of the event (and the span).
    """
    attrs: dict[str, Any] = dict(attributes)
    tracer = _recording_tracer()
    started = time.perf_counter()
    cm = otel_span = None
    if tracer is not None:
        cm = tracer.start_as_current_span(name, attributes=_otel_attributes(attrs), record_exception=False,
                                             set_status_on_exception=False)
        otel_span = cm.__enter__()
    error: BaseException | None = None
    try:
        yield attrs
    except BaseException as exc:
        error = exc
        raise
    finally:
        duration = time.perf_counter() - started
        message = None if error is None else f"{type(error).__name__}: {error}"
        if otel_span is not None:
            try:
                otel_span.set_attributes(_otel_attributes(attrs))
                if error is not None:
                    from opentelemetry.trace import Status, StatusCode

                    otel_span.record_exception(error)
                    otel_span.set_status(Status(StatusCode.ERROR, message))
            finally:
                cm.__exit__(None, None, None)
        _dispatch(Event(name=name, attributes=attrs, duration_s=duration,
                        level=level if error is None else max(level, error_level), error=message))


# ---- OpenTelemetry (optional) -------------------------------------------------------------------

_otel_module: Any = None
_otel_checked = False
_otel_tracer: Any = None


def _otel() -> Any:
    """The `opentelemetry.trace` module, or None when it is not installed or TINKEX_OTEL is off."""
    global _otel_module, _otel_checked
    if not _otel_checked:
        _otel_checked = True
        if os.environ.get("TINKEX_OTEL", "1").strip().lower() not in ("0", "false", "no", "off"):
            try:
                from opentelemetry import trace
            except ImportError:
                trace = None
            _otel_module = trace
    return _otel_module


def _tracer() -> Any:
    global _otel_tracer
    if _otel_tracer is None:
        from ._constants import TINKEX_VERSION

        _otel_tracer = _otel().get_tracer("tinkex", TINKEX_VERSION)
    return _otel_tracer


def _recording_tracer() -> Any:
    """The tracer for tinkex's spans, or None when OpenTelemetry is off or no tracer provider is set
    (the API's default provider records nothing, and a span through it costs ~15 us a request)."""
    otel = _otel()
    if otel is None:
        return None
    tracer = _tracer()
    if isinstance(tracer, otel.ProxyTracer) and isinstance(otel.get_tracer_provider(), otel.ProxyTracerProvider):
        return None
    return tracer


def set_opentelemetry(enabled: bool) -> None:
    """Turn OpenTelemetry spans on or off at run time (on needs `opentelemetry-api`)."""
    global _otel_module, _otel_checked
    if enabled:
        from opentelemetry import trace  # raises ImportError when it is not installed

        _otel_module, _otel_checked = trace, True
    else:
        _otel_module, _otel_checked = None, True


def inject_trace_headers(headers: MutableMapping[str, str]) -> None:
    """Add `traceparent`/`tracestate` of the active span (only when there is a valid one)."""
    otel = _otel()
    if otel is None or not otel.get_current_span().get_span_context().is_valid:
        return
    try:
        from opentelemetry.propagate import inject

        inject(headers)
    except Exception:  # a misconfigured propagator must not break requests
        logger.debug("trace header injection failed", exc_info=True)


def _otel_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        if isinstance(value, (str, bool, int, float)):
            out[key] = value
        else:
            out[key] = str(value)
    return out
