"""Queue-state observability: one log line and one hook call per change, not one per poll.

The tinkex server has no tenant quotas, so it never pauses a queue by itself; a proxy in front of the
real server answers the first polls of each request the way a paused server does (`try_again` with
`paused_rate_limit`, then `paused_capacity`, then `active`), and forwards everything else.
"""

from __future__ import annotations

import json
import logging
import threading

import pytest

import tinkex
from tinkex import types
from tinkex.client import metrics, queue_state, telemetry
from tinkex.client.queue_state import QueueStateTracker, parse_state

from ..conftest import ALICE
from ._http import Recorded, RecordingProxy
from .conftest import MODEL, sft_datum

SCRIPT = [("paused_rate_limit", None)] * 4 + [("paused_capacity", "GPUs are busy")] * 3 + [("active", None)] * 2


class PausingProxy(RecordingProxy):
    """Answers the first polls of every request with the scripted queue states."""

    def __init__(self, upstream: str):
        super().__init__(upstream)
        self.polls: dict[str, int] = {}
        self.poll_lock = threading.Lock()

    def handle(self, record: Recorded) -> tuple[int, dict[str, str], bytes]:
        if record.path.startswith("/api/v1/retrieve_future"):
            request_id = json.loads(record.body)["request_id"]
            with self.poll_lock:
                n = self.polls.get(request_id, 0)
                self.polls[request_id] = n + 1
            if n < len(SCRIPT):
                state, reason = SCRIPT[n]
                body = {"type": "try_again", "request_id": request_id, "queue_state": state}
                if reason:
                    body["queue_state_reason"] = reason
                return 200, {"content-type": "application/json"}, json.dumps(body).encode()
        return super().handle(record)


@pytest.fixture
def pausing(server):
    proxy = PausingProxy(server.base_url).start()
    yield proxy
    proxy.stop()


def test_training_pauses_are_reported_once_per_change(pausing, caplog):
    service = tinkex.ServiceClient(base_url=pausing.base_url, api_key=ALICE)
    trainer = service.create_lora_training_client(MODEL, rank=4).result(60)
    changes: list[queue_state.QueueStateChange] = []
    remove = queue_state.add_hook(lambda change: changes.append(change) if change.resource == trainer.model_id
                                  else None)
    before = metrics.REGISTRY.value("tinkex_queue_state_changes_total", kind="training", state="paused_capacity") or 0
    try:
        caplog.set_level(logging.INFO, logger="tinkex")
        with telemetry.capture(telemetry.QUEUE_STATE_CHANGE) as events:
            trainer.forward_backward([sft_datum(list(range(5, 20)))], "cross_entropy").result(60)
    finally:
        remove()
        service.close().result(30)
    # nine polls said "paused" or "active"; three changes were reported
    assert [(c.state, c.reason, c.previous_state) for c in changes] == [
        ("paused_rate_limit", "concurrent training clients rate limit hit", "active"),
        ("paused_capacity", "GPUs are busy", "paused_rate_limit"),
        ("active", None, "paused_capacity")]
    assert changes[-1].paused_for_s is not None and changes[-1].paused_for_s >= 0
    lines = [r for r in caplog.records if r.name == "tinkex" and trainer.model_id in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.WARNING, logging.INFO]
    assert "paused (paused_rate_limit). Reason: concurrent training clients rate limit hit" in lines[0].getMessage()
    assert "Reason: GPUs are busy" in lines[1].getMessage() and "active again" in lines[2].getMessage()
    assert [e.attributes["state"] for e in events if e.attributes["resource"] == trainer.model_id] == \
        ["paused_rate_limit", "paused_capacity", "active"]
    assert metrics.REGISTRY.value("tinkex_queue_state_changes_total", kind="training",
                                  state="paused_capacity") == before + 1


def test_sampling_pauses_are_reported_too(pausing, caplog):
    service = tinkex.ServiceClient(base_url=pausing.base_url, api_key=ALICE)
    sampler = service.create_sampling_client(base_model=MODEL).result(60)
    changes: list[queue_state.QueueStateChange] = []
    remove = queue_state.add_hook(changes.append)
    try:
        caplog.set_level(logging.INFO, logger="tinkex")
        for _ in range(2):  # a second request goes through the same pauses: reported again, once each
            sampler.sample(types.ModelInput.from_ints([3, 4, 5]), 1, types.SamplingParams(max_tokens=2)).result(60)
    finally:
        remove()
        service.close().result(30)
    mine = [c for c in changes if c.resource == sampler.sampling_session_id]
    assert [c.state for c in mine] == ["paused_rate_limit", "paused_capacity", "active"] * 2
    assert {c.kind for c in mine} == {"sampling"}
    assert mine[0].reason == "concurrent sampler weights limit hit"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "Sampling for" in r.getMessage()]
    assert len(warnings) == 4


def test_the_tracker_dedupes_and_a_broken_hook_is_contained(caplog):
    tracker = QueueStateTracker("training", "model-x")
    seen: list[str] = []

    def broken(_change: queue_state.QueueStateChange) -> None:
        raise RuntimeError("hook bug")

    removers = [queue_state.add_hook(lambda c: seen.append(c.state) if c.resource == "model-x" else None),
                queue_state.add_hook(broken)]
    try:
        for state, reason in [("active", None), ("PAUSED_CAPACITY", None), ("paused_capacity", None),
                              ("paused_capacity", "new reason"), ("weird", None), ("weird", None), ("active", None),
                              ("active", None)]:
            tracker(state, reason)
    finally:
        for remove in removers:
            remove()
    assert seen == ["paused_capacity", "paused_capacity", "unknown", "active"]
    assert tracker.changes == 4 and tracker.state == "active"
    assert "queue-state hook" in caplog.text
    assert parse_state(None) == "active" and parse_state("Paused_Rate_Limit") == "paused_rate_limit"
    assert parse_state("something-new") == "unknown"
