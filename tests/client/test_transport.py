"""Transport: retries, backoff, Retry-After, x-should-retry, idempotency keys and typed errors,
against a real HTTP server on loopback that answers from a script -- each through both HTTP
transports the SDK uses (httpx's own, and pyqwest's for sampling)."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from tinkex import types
from tinkex.client._transport import Transport, current_sdk_method, retry_delay, server_retry_after

from ._http import Reply

KEY = "tml-test-key"


@pytest.fixture(autouse=True, params=["httpx", "pyqwest"])
def http_transport(request, monkeypatch) -> str:
    """Every test here runs with every pool on httpx, then with every pool on pyqwest: the retry
    rules and typed errors must not depend on which one carries a request."""
    monkeypatch.setenv("TINKEX_HTTP_TRANSPORT", request.param)
    return request.param


def test_the_chosen_transport_carries_the_request(scripted, http_transport):
    """The server sees the two clients differently -- httpx writes `connection: keep-alive`,
    pyqwest's hyper leaves it to HTTP/1.1's default -- so the request really took the chosen one."""
    scripted.script("/api/v1/which", Reply(200, {}))
    _request(Transport(scripted.base_url, KEY), "POST", "/api/v1/which", json={}, purpose="train")
    (record,) = scripted.requests_to("/api/v1/which")
    assert ("connection" in record.headers) == (http_transport == "httpx")


def _request(transport: Transport, *args, **kwargs):
    async def run():
        try:
            return await transport.request(*args, **kwargs)
        finally:
            await transport.aclose()
    return asyncio.run(run())


def test_retries_429_and_503_honouring_retry_after(scripted):
    scripted.script("/api/v1/thing",
                    Reply(429, {"detail": "slow down"}, {"retry-after-ms": "40"}),
                    Reply(503, {"detail": "busy"}, {"retry-after": "0.05"}),
                    Reply(200, {"ok": True}))
    started = time.monotonic()
    response = _request(Transport(scripted.base_url, KEY), "POST", "/api/v1/thing", json={"a": 1})
    elapsed = time.monotonic() - started
    assert response.json() == {"ok": True}
    sent = scripted.requests_to("/api/v1/thing")
    assert len(sent) == 3
    # The server's delays (40 ms, 50 ms) were used instead of the default 0.5 s / 1 s backoff.
    assert elapsed < 0.6
    keys = {r.headers["x-idempotency-key"] for r in sent}
    assert len(keys) == 1 and next(iter(keys)).startswith("stainless-python-retry-")
    assert [r.headers["x-stainless-retry-count"] for r in sent] == ["0", "1", "2"]
    assert all(r.headers["x-api-key"] == KEY and r.json() == {"a": 1} for r in sent)


def test_default_backoff_is_exponential_with_jitter():
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (5, 10.0), (20, 10.0)]:
        delays = [retry_delay(attempt) for _ in range(50)]
        assert all(0.75 * ceiling <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered


def test_retry_after_bounds():
    def resp(**headers):
        return httpx.Response(429, headers=headers)
    assert server_retry_after(resp(**{"retry-after-ms": "1500"})) == 1.5
    assert server_retry_after(resp(**{"retry-after": "3"})) == 3.0
    assert server_retry_after(resp(**{"retry-after": "120"})) is None  # beyond 60 s: ignored
    assert server_retry_after(resp(**{"retry-after": "0"})) is None
    date = httpx.Response(429, headers={"retry-after": time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                                                      time.gmtime(time.time() + 5))})
    assert 3 <= server_retry_after(date) <= 6


@pytest.mark.parametrize("status, error", [
    (400, types.BadRequestError), (401, types.AuthenticationError), (402, types.BillingError),
    (403, types.PermissionDeniedError), (404, types.NotFoundError), (422, types.UnprocessableEntityError),
])
def test_4xx_is_a_typed_error_without_retry(scripted, status, error):
    scripted.script("/api/v1/thing", Reply(status, {"detail": "nope"}))
    with pytest.raises(error) as info:
        _request(Transport(scripted.base_url, KEY), "POST", "/api/v1/thing", json={})
    assert len(scripted.requests_to("/api/v1/thing")) == 1
    assert info.value.status_code == status
    assert info.value.body == {"detail": "nope"}
    assert str(info.value) == f'Error code: {status} - {{"detail": "nope"}}'
    assert isinstance(info.value, types.APIStatusError) and isinstance(info.value, types.TinkerError)


def test_retryable_statuses_exhaust_into_typed_errors(scripted):
    for status, error in [(408, types.APIStatusError), (409, types.ConflictError), (429, types.RateLimitError),
                          (500, types.InternalServerError), (502, types.InternalServerError)]:
        scripted.script(f"/api/v1/s{status}", *[Reply(status, {"detail": "x"}, {"retry-after-ms": "1"})] * 3)
        with pytest.raises(error):
            _request(Transport(scripted.base_url, KEY), "POST", f"/api/v1/s{status}", json={}, max_retries=2)
        assert len(scripted.requests_to(f"/api/v1/s{status}")) == 3


def test_x_should_retry_overrides_status(scripted):
    scripted.script("/api/v1/no", Reply(503, {"detail": "final"}, {"x-should-retry": "false"}))
    with pytest.raises(types.InternalServerError):
        _request(Transport(scripted.base_url, KEY), "POST", "/api/v1/no", json={})
    assert len(scripted.requests_to("/api/v1/no")) == 1

    scripted.script("/api/v1/yes", Reply(400, {"detail": "again"}, {"x-should-retry": "true", "retry-after-ms": "1"}),
                    Reply(200, {"ok": 1}))
    assert _request(Transport(scripted.base_url, KEY), "POST", "/api/v1/yes", json={}).json() == {"ok": 1}
    assert len(scripted.requests_to("/api/v1/yes")) == 2


def test_empty_400_is_a_dropped_connection_and_retried(scripted):
    scripted.script("/api/v1/proxy", Reply(400, b""), Reply(200, {"ok": 1}))
    assert _request(Transport(scripted.base_url, KEY), "POST", "/api/v1/proxy", json={}).json() == {"ok": 1}
    scripted.script("/api/v1/proxy2", Reply(400, b""))
    with pytest.raises(types.APIConnectionError):
        _request(Transport(scripted.base_url, KEY), "POST", "/api/v1/proxy2", json={}, max_retries=0)


def test_connection_refused_and_timeout_are_typed():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(types.APIConnectionError) as info:
        _request(Transport(f"http://127.0.0.1:{port}", KEY), "GET", "/api/v1/x", max_retries=1)
    assert not isinstance(info.value, types.APITimeoutError)


def test_timeout_is_api_timeout_error(scripted):
    scripted.script("/api/v1/slow", Reply(200, {"ok": 1}, delay=1.0))
    with pytest.raises(types.APITimeoutError):
        _request(Transport(scripted.base_url, KEY), "POST", "/api/v1/slow", json={}, timeout=0.2, max_retries=0)


def test_standard_headers_and_sdk_method(scripted):
    scripted.script("/api/v1/h", Reply(200, {}), Reply(200, {}))
    transport = Transport(scripted.base_url, KEY, {"X-Custom": "yes"})

    async def run():
        await transport.request("GET", "/api/v1/h")
        token = current_sdk_method.set("TrainingClient.forward_backward")
        try:
            await transport.request("POST", "/api/v1/h", json={})
        finally:
            current_sdk_method.reset(token)
        await transport.aclose()

    asyncio.run(run())
    background, public = scripted.requests_to("/api/v1/h")
    for record in (background, public):
        assert record.headers["x-api-key"] == KEY
        assert record.headers["x-stainless-package-version"] == "0.38.0"
        assert record.headers["x-stainless-async"] == "async:asyncio"
        assert record.headers["x-custom"] == "yes"
        assert "AsyncTinker/Python 0.38.0" in record.headers["user-agent"]
    assert "x-idempotency-key" not in background.headers  # GETs carry none
    assert "x-sdk-method" not in background.headers
    assert public.headers["x-sdk-method"] == "TrainingClient.forward_backward"
    assert public.headers["x-sdk-version"] == "0.38.0"


def test_final_conflict_is_not_retried_by_the_submit_loop(scripted):
    """x-should-retry: false also stops the submit-level retry loop (409 is otherwise retried)."""
    import tinkex

    path = "/api/v1/training_runs/s:train:0/checkpoints/weights/a/publish"
    scripted.script(path, Reply(409, {"detail": "already public"}, {"x-should-retry": "false"}))
    rest = tinkex.RestClient(base_url=scripted.base_url, api_key=KEY)
    started = time.monotonic()
    with pytest.raises(types.ConflictError):
        rest.publish_checkpoint_from_tinker_path("tinker://s:train:0/weights/a").result(30)
    assert len(scripted.requests_to(path)) == 1 and time.monotonic() - started < 2


def test_cookies_the_server_sets_come_back(scripted):
    """Requests skip httpx.AsyncClient.send where they can; its cookie jar still works."""
    scripted.script("/api/v1/login", Reply(200, {}, {"set-cookie": "lb=node-7; Path=/"}))
    scripted.script("/api/v1/step", Reply(200, {}))
    transport = Transport(scripted.base_url, KEY)

    async def run():
        try:
            await transport.request("POST", "/api/v1/login", json={}, purpose="train")
            await transport.request("POST", "/api/v1/step", json={}, purpose="train")
        finally:
            await transport.aclose()

    asyncio.run(run())
    (step,) = scripted.requests_to("/api/v1/step")
    assert step.headers.get("cookie") == "lb=node-7"


def test_redirects_are_followed(scripted):
    """A redirect met on the direct path is sent again through httpx.AsyncClient, which follows it."""
    moved_on = Reply(307, b"", {"location": "/api/v1/new"})
    scripted.script("/api/v1/old", moved_on, moved_on)
    scripted.script("/api/v1/new", Reply(200, {"moved": True}))
    response = _request(Transport(scripted.base_url, KEY), "POST", "/api/v1/old", json={"a": 1}, purpose="train")
    assert response.json() == {"moved": True} and response.request.url.path == "/api/v1/new"
    (moved,) = scripted.requests_to("/api/v1/new")
    assert moved.method == "POST" and moved.json() == {"a": 1}  # a 307 keeps the method and body


def test_requests_built_directly_match_httpx_build_request(scripted):
    """Requests without query parameters or cookies skip AsyncClient.build_request: they carry the
    same headers as one it builds (a request with parameters still takes it), and each call its own
    version-4 idempotency key."""
    import uuid

    scripted.script("/api/v1/built", Reply(200, {}), Reply(200, {}), Reply(200, {}))
    transport = Transport(scripted.base_url, KEY)

    async def run():
        try:
            for params in (None, None, {"page": "2"}):
                await transport.request("POST", "/api/v1/built", json={"a": 1}, params=params, purpose="train")
        finally:
            await transport.aclose()

    asyncio.run(run())
    direct, again, built = scripted.requests_to("/api/v1/built")
    assert direct.path == "/api/v1/built" and built.path == "/api/v1/built?page=2"
    per_call = {"x-idempotency-key"}
    assert {k: v for k, v in direct.headers.items() if k not in per_call} == \
        {k: v for k, v in built.headers.items() if k not in per_call}
    keys = [r.headers["x-idempotency-key"] for r in (direct, again, built)]
    assert len(set(keys)) == 3
    assert all(key.startswith("stainless-python-retry-") and uuid.UUID(key[23:]).version == 4 for key in keys)
