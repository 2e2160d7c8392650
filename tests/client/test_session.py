"""Sessions: the start-up sequence, heartbeats, finish on close, and batched telemetry."""

from __future__ import annotations

import time

import httpx
import pytest

import tinkex
from tinkex.client import _holder

from ..conftest import ALICE
from ._http import Reply
from .conftest import MODEL


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_startup_sequence_and_finish(scripted, monkeypatch):
    monkeypatch.setenv("TINKER_TAGS", "beta,alpha,beta")
    scripted.defaults["/api/v1/create_sampling_session"] = Reply(body={"sampling_session_id": "sess-1:sample:0"})
    client = tinkex.ServiceClient(user_metadata={"team": "x"}, project_id="proj", display_name="demo",
                                  base_url=scripted.base_url + "/", api_key="tml-fake")
    assert scripted.records == []  # construction is lazy
    sampler = client.create_sampling_client(base_model=MODEL).result(30)
    assert sampler.get_base_model() == MODEL
    client.close("success", "all done").result(30)

    paths = [r.path for r in scripted.records]
    assert paths[:4] == ["/api/v1/client/config", "/api/v1/client/dynamic_config", "/api/v1/create_session",
                         "/api/v1/create_sampling_session"]
    assert scripted.requests_to("/api/v1/client/config")[0].json() == {"sdk_version": "0.38.0"}
    create = scripted.requests_to("/api/v1/create_session")[0]
    assert create.json() == {"tags": ["alpha", "beta"], "user_metadata": {"team": "x"}, "sdk_version": "0.38.0",
                             "project_id": "proj", "display_name": "demo", "type": "create_session"}
    assert "x-sdk-method" not in create.headers  # a background request
    sampling = scripted.requests_to("/api/v1/create_sampling_session")[0]
    assert sampling.json() == {"session_id": "sess-1", "sampling_session_seq_id": 0, "base_model": MODEL,
                               "type": "create_sampling_session"}
    assert sampling.headers["x-sdk-method"] == "ServiceClient.create_sampling_client"
    finish = scripted.requests_to("/api/v1/sessions/sess-1/finish")
    assert [f.json() for f in finish] == [{"reason": {"type": "success"}, "detail": "all done"}]
    # Telemetry was flushed on close: the session start, under this session and process.
    batches = [r.json() for r in scripted.requests_to("/api/v1/telemetry")]
    events = [e for b in batches for e in b["events"]]
    assert batches and all(b["session_id"] == "sess-1" and b["sdk_version"] == "0.38.0" and b["process_uuid"]
                           for b in batches)
    start = next(e for e in events if e["event"] == "SESSION_START")
    assert start["severity"] == "INFO" and start["timestamp"].endswith("Z") and start["event_session_index"] == 0
    assert client.close().result(5) is None  # idempotent
    assert len(scripted.requests_to("/api/v1/sessions/sess-1/finish")) == 1


def test_context_manager_reports_errors(scripted):
    with pytest.raises(KeyError):
        with tinkex.ServiceClient(base_url=scripted.base_url, api_key="tml-fake") as client:
            client.holder.run(client.holder.ensure_ready()).result(30)
            raise KeyError("boom")
    finish = scripted.requests_to("/api/v1/sessions/sess-1/finish")[0].json()
    assert finish["reason"] == {"type": "errored"} and "boom" in finish["detail"]


def test_heartbeats_until_the_session_is_gone(scripted, monkeypatch):
    monkeypatch.setattr(_holder, "HEARTBEAT_INTERVAL_S", 0.1)
    client = tinkex.ServiceClient(base_url=scripted.base_url, api_key="tml-fake")
    client.holder.run(client.holder.ensure_ready()).result(30)
    assert _wait_for(lambda: len(scripted.requests_to("/api/v1/session_heartbeat")) >= 3)
    beat = scripted.requests_to("/api/v1/session_heartbeat")[0]
    assert beat.json() == {"session_id": "sess-1", "type": "session_heartbeat"}
    scripted.defaults["/api/v1/session_heartbeat"] = Reply(410, {"detail": "session finished"})
    assert _wait_for(lambda: scripted.requests_to("/api/v1/session_heartbeat")[-1].status == 410)
    count = len(scripted.requests_to("/api/v1/session_heartbeat"))
    time.sleep(0.5)
    assert len(scripted.requests_to("/api/v1/session_heartbeat")) == count  # a 410 stops the heartbeat
    client.close().result(30)


def test_heartbeat_against_the_real_server(proxy, monkeypatch):
    monkeypatch.setattr(_holder, "HEARTBEAT_INTERVAL_S", 0.2)
    client = tinkex.ServiceClient(base_url=proxy.base_url, api_key=ALICE)
    client.holder.run(client.holder.ensure_ready()).result(30)
    assert _wait_for(lambda: len(proxy.requests_to("/api/v1/session_heartbeat")) >= 2)
    assert all(r.status == 200 for r in proxy.requests_to("/api/v1/session_heartbeat"))
    client.close().result(30)
    session_id = client.session_id
    after = httpx.post(f"{proxy.upstream}/api/v1/session_heartbeat", headers={"x-api-key": ALICE},
                       json={"session_id": session_id, "type": "session_heartbeat"})
    assert after.status_code == 410  # finished on close


def test_errors_are_reported_to_telemetry(scripted):
    scripted.script("/api/v1/create_model", Reply(400, {"detail": "unknown base model"}))
    client = tinkex.ServiceClient(base_url=scripted.base_url, api_key="tml-fake")
    with pytest.raises(tinkex.BadRequestError):
        client.create_lora_training_client("nope").result(30)
    assert _wait_for(lambda: any(e.get("event_name") == "user_error"
                                 for r in scripted.requests_to("/api/v1/telemetry") for e in r.json()["events"]))
    client.close().result(30)


def test_telemetry_can_be_switched_off(scripted, monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    client = tinkex.ServiceClient(base_url=scripted.base_url, api_key="tml-fake")
    client.holder.run(client.holder.ensure_ready()).result(30)
    assert client.get_telemetry() is None
    client.close().result(30)
    assert scripted.requests_to("/api/v1/telemetry") == []
    assert scripted.requests_to("/api/v1/create_session")


def _jwt(lifetime: int = 3600) -> str:
    import base64
    import json

    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    now = int(time.time())
    return f"{part({'alg': 'none'})}.{part({'iat': now, 'exp': now + lifetime, 'sub': 'user-1'})}.sig"


def test_jwt_mode_exchanges_and_replays_after_invalid_token(scripted):
    first, second = _jwt(), _jwt(7200)
    scripted.defaults["/api/v1/client/config"] = Reply(body={"pjwt_auth_enabled": True})
    scripted.script("/api/v1/auth/token", Reply(body={"jwt": first}), Reply(body={"jwt": second}))
    scripted.script("/api/v1/get_server_capabilities",
                    Reply(401, {"detail": "expired"}, {"www-authenticate": 'Bearer error="invalid_token"'}),
                    Reply(body={"supported_models": []}))
    rest = tinkex.RestClient(base_url=scripted.base_url, api_key="tml-raw")
    assert rest.get_server_capabilities().result(30).supported_models == []
    token_calls = scripted.requests_to("/api/v1/auth/token")
    assert [r.headers["x-api-key"] for r in token_calls] == ["tml-raw", "tml-raw"]
    assert token_calls[0].json() == {}
    assert scripted.requests_to("/api/v1/client/config")[0].headers["x-api-key"] == "tml-raw"
    caps = scripted.requests_to("/api/v1/get_server_capabilities")
    assert [r.headers["x-api-key"] for r in caps] == [first, second]
    assert rest.whoami().result(30).user_urn == "user-1"  # read from the JWT, no request
