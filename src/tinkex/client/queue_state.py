"""Queue-state observability: the server says a request waits because the tenant is rate limited
(`paused_rate_limit`) or the backend is short of capacity (`paused_capacity`).

Every poll of a waiting request carries the queue state, but the user hears about it once per
*change*, per training model or sampling session:

- one log line on the `tinkex` logger: a WARNING when a pause starts (or its reason changes),
  an INFO line when the queue is active again (with how long the pause lasted);
- a `tinkex.queue.state_change` telemetry event and the `tinkex_queue_state_changes_total` metric;
- the hooks registered with `add_hook(fn)`, called with a `QueueStateChange`.

    from tinkex.client import queue_state
    remove = queue_state.add_hook(lambda change: print(change.resource, change.state, change.reason))

Hooks run on the SDK's event-loop thread: keep them quick, and do not block on SDK futures there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from . import metrics as _metrics
from . import telemetry as _telemetry

logger = logging.getLogger("tinkex")

QueueStateName = Literal["active", "paused_rate_limit", "paused_capacity", "unknown"]
KNOWN_STATES = ("active", "paused_rate_limit", "paused_capacity")
DEFAULT_REASONS = {
    ("training", "paused_rate_limit"): "concurrent training clients rate limit hit",
    ("sampling", "paused_rate_limit"): "concurrent sampler weights limit hit",
    ("training", "paused_capacity"): "Tinker backend is running short on capacity, please wait",
    ("sampling", "paused_capacity"): "Tinker backend is running short on capacity, please wait",
}


def parse_state(value: str | None) -> QueueStateName:
    """Case-insensitive; anything unrecognised is `unknown` (never silently `active`)."""
    if value is None:
        return "active"
    lowered = str(value).strip().lower()
    return lowered if lowered in KNOWN_STATES else "unknown"  # type: ignore[return-value]


@dataclass(frozen=True)
class QueueStateChange:
    kind: Literal["training", "sampling"]
    resource: str  # the model id or sampling session id (or what is being created)
    state: QueueStateName
    reason: str | None  # the server's reason, else a default for paused states
    previous_state: QueueStateName
    previous_reason: str | None
    timestamp: float  # time.time()
    paused_for_s: float | None = None  # set when a pause ends: how long it lasted

    @property
    def paused(self) -> bool:
        return self.state.startswith("paused")


Hook = Callable[[QueueStateChange], None]
_hooks = _telemetry.Listeners()


def add_hook(hook: Hook) -> Callable[[], None]:
    """Call `hook(change)` on every queue-state change; returns a function that removes it."""
    return _hooks.add(hook)


def remove_hook(hook: Hook) -> None:
    _hooks.remove(hook)


class QueueStateTracker:
    """The queue state of one training model or sampling session; called by the poll loop with
    `(queue_state, queue_state_reason)` on every answer that carries them."""

    def __init__(self, kind: Literal["training", "sampling"], resource: str, label: str | None = None):
        self.kind = kind
        self.resource = resource
        self.label = label or (f"Training of {resource}" if kind == "training" else f"Sampling for {resource}")
        self.state: QueueStateName = "active"
        self.reason: str | None = None
        self._paused_since: float | None = None
        self._lock = threading.Lock()
        self.changes = 0

    def __call__(self, queue_state: str | None, queue_state_reason: str | None = None) -> None:
        state = parse_state(queue_state)
        reason = queue_state_reason or DEFAULT_REASONS.get((self.kind, state))
        now = time.monotonic()
        with self._lock:
            if state == self.state and (state == "active" or reason == self.reason):
                return
            previous, previous_reason = self.state, self.reason
            paused_for = None
            if state == "active" and self._paused_since is not None:
                paused_for = now - self._paused_since
                self._paused_since = None
            elif state != "active" and self._paused_since is None:
                self._paused_since = now
            self.state, self.reason = state, (reason if state != "active" else None)
            self.changes += 1
        change = QueueStateChange(kind=self.kind, resource=self.resource, state=state, reason=self.reason,
                                  previous_state=previous, previous_reason=previous_reason, timestamp=time.time(),
                                  paused_for_s=paused_for)
        self._announce(change)

    def _announce(self, change: QueueStateChange) -> None:
        if change.paused:
            logger.warning("%s is paused (%s). Reason: %s", self.label, change.state, change.reason)
        elif change.state == "active":
            lasted = f" after {change.paused_for_s:.1f} s" if change.paused_for_s is not None else ""
            logger.info("%s is active again%s", self.label, lasted)
        else:
            logger.warning("%s: the server reports an unknown queue state. Reason: %s", self.label,
                           change.reason or "none given")
        _metrics.REGISTRY.increment("tinkex_queue_state_changes_total", kind=change.kind, state=change.state)
        _telemetry.emit(_telemetry.QUEUE_STATE_CHANGE, level=logging.INFO, kind=change.kind,
                        resource=change.resource, state=change.state, reason=change.reason,
                        previous_state=change.previous_state, paused_for_s=change.paused_for_s)
        for hook in _hooks:
            try:
                hook(change)
            except Exception:
                logger.exception("queue-state hook %r failed", hook)
