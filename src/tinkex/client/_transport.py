"""HTTP to a Tinker server: httpx clients per purpose, retries with backoff, typed errors.

One `Transport` belongs to one holder (one base URL and credential). Its httpx clients live on
the SDK event loop. `request()` is the only way a request leaves the SDK; it applies the retry
rules of the protocol:

- connection errors and timeouts, and statuses 408, 409, 429 and >= 500 are retried, unless the
  server says `x-should-retry: false` (and `x-should-retry: true` makes anything retryable);
- the delay is the server's `retry-after-ms` / `retry-after` when it lies in (0, 60] s, otherwise
  `min(0.5 * 2**n, 10)` s less up to 25 % jitter;
- every non-GET request carries an `x-idempotency-key`, the same for all retries of one call;
- a 400 with an empty body is a proxy dropping the request, treated as a connection error;
- what is left over becomes a typed error: an APIStatusError subclass chosen by status,
  APIConnectionError or APITimeoutError.
"""

from __future__ import annotations

import asyncio
import contextvars
import email.utils
import functools
import json as jsonlib
import logging
import os
import platform
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx

from ..types._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    status_error_class,
)
from . import metrics as _metrics
from . import telemetry as _telemetry
from ._constants import PROTOCOL_SDK_VERSION, TINKEX_VERSION
from .metrics import request_kind

logger = logging.getLogger("tinkex")

# The public method that is running (e.g. "TrainingClient.forward_backward"); only the outermost
# call counts, and background work (heartbeat, telemetry, config) carries none.
current_sdk_method: contextvars.ContextVar[str | None] = contextvars.ContextVar("tinkex_sdk_method", default=None)

RETRYABLE_STATUSES = frozenset({408, 409, 429})
DEFAULT_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 5.0
MAX_RETRY_DELAY_S = 10.0
INITIAL_RETRY_DELAY_S = 0.5

PURPOSES = ("session", "train", "sample", "retrieve", "rest", "telemetry")
# Proxies from the environment are applied by httpx.AsyncClient.send, which then carries every request.
_PROXIED = any(os.environ.get(name) for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                                                   "https_proxy", "all_proxy"))
# Sampling (asample and the retrieve_future polls of its results) goes through pyqwest's transport
# where it is installed. Samplers keep dozens to thousands of requests in flight, and httpx's own
# pool re-checks every idle connection (a socket poll through anyio) on each request and response,
# so its cost per request grows with the connections open: ~0.5 ms of CPU alone, ~1 ms at 32 in
# flight, against ~0.5 ms for pyqwest at any concurrency. For one request at a time (training, REST)
# pyqwest is the slower (a hop to its own I/O thread and back), so the other pools stay on httpx.
# TINKEX_HTTP_TRANSPORT=httpx keeps everything on httpx; =pyqwest puts every pool on pyqwest.
CONCURRENT_PURPOSES = frozenset({"sample"})
_pyqwest_pid: int | None = None  # the process whose pyqwest I/O threads run (they do not survive a fork)


# Idempotency keys need to be unique, not secret: a private generator (seeded from the OS, again in
# a forked child) spares a getrandom system call per request, and leaves the `random` module alone.
_KEYS = random.Random()
os.register_at_fork(after_in_child=_KEYS.seed)


def _random_uuid() -> uuid.UUID:
    return uuid.UUID(int=_KEYS.getrandbits(128), version=4)


@functools.lru_cache(maxsize=256)
def _parsed_url(url: str) -> httpx.URL:
    return httpx.URL(url)  # immutable: one parse serves every request to the same URL


def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64"}.get(machine, machine or "unknown")


def _platform_headers() -> dict[str, str]:
    return {
        "user-agent": f"tinkex/{TINKEX_VERSION} (AsyncTinker/Python {PROTOCOL_SDK_VERSION} compatible)",
        "x-stainless-lang": "python",
        "x-stainless-package-version": PROTOCOL_SDK_VERSION,
        "x-stainless-os": platform.system() or "Unknown",
        "x-stainless-arch": _arch(),
        "x-stainless-runtime": platform.python_implementation(),
        "x-stainless-runtime-version": platform.python_version(),
        "x-stainless-async": "async:asyncio",
        "x-tinkex-version": TINKEX_VERSION,
    }


def should_retry_status(response: httpx.Response) -> bool:
    override = response.headers.get("x-should-retry")
    if override == "true":
        return True
    if override == "false":
        return False
    return response.status_code in RETRYABLE_STATUSES or response.status_code >= 500


def server_retry_after(response: httpx.Response | None) -> float | None:
    """The server's requested delay in seconds, when it is in (0, 60]."""
    if response is None:
        return None
    delay: float | None = None
    ms = response.headers.get("retry-after-ms")
    if ms is not None:
        try:
            delay = float(ms) / 1000.0
        except ValueError:
            delay = None
    if delay is None:
        value = response.headers.get("retry-after")
        if value is not None:
            try:
                delay = float(value)
            except ValueError:
                parsed = email.utils.parsedate_tz(value)
                if parsed is not None:
                    delay = email.utils.mktime_tz(parsed) - time.time()
    if delay is not None and 0 < delay <= 60:
        return delay
    return None


def retry_delay(attempt: int, response: httpx.Response | None = None) -> float:
    """Seconds to wait before retry number `attempt` (0-based)."""
    from_server = server_retry_after(response)
    if from_server is not None:
        return from_server
    base = min(INITIAL_RETRY_DELAY_S * 2.0**attempt, MAX_RETRY_DELAY_S)
    return base * (1.0 - 0.25 * random.random())


def _uses_pyqwest(purpose: str) -> bool:
    choice = os.environ.get("TINKEX_HTTP_TRANSPORT", "").strip().lower()
    if choice == "httpx" or (choice != "pyqwest" and purpose not in CONCURRENT_PURPOSES):
        return False
    if _pyqwest_pid not in (None, os.getpid()):  # a forked child: its requests would wait forever
        return False
    try:
        import pyqwest.httpx  # noqa: F401
    except ImportError:
        if choice == "pyqwest":
            raise ImportError("TINKEX_HTTP_TRANSPORT=pyqwest, but pyqwest is not installed") from None
        return False
    return True


def _pyqwest_transport() -> httpx.AsyncBaseTransport:
    import pyqwest
    from pyqwest.httpx import AsyncPyqwestTransport

    global _pyqwest_pid
    _pyqwest_pid = os.getpid()
    # httpx follows redirects (per request, as for the other pools); the SDK makes its own spans.
    return AsyncPyqwestTransport(transport=pyqwest.HTTPTransport(
        tls_include_system_certs=True, connect_timeout=CONNECT_TIMEOUT_S, follow_redirects=False,
        enable_otel=False))


def parse_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError):
        try:
            return response.text or None
        except Exception:
            return None


def make_status_error(response: httpx.Response) -> APIStatusError:
    body = parse_body(response)
    shown = jsonlib.dumps(body) if isinstance(body, (dict, list)) else body
    message = f"Error code: {response.status_code} - {shown}"
    return status_error_class(response.status_code)(message, response=response, body=body)


def multipart_files(files: Any, opened: list[Any]) -> list[tuple[str, Any]]:
    """Normalize `files` for httpx: paths are opened (and added to `opened`, for the caller to close)."""
    items = list(files.items()) if isinstance(files, Mapping) else list(files)
    out: list[tuple[str, Any]] = []
    for name, value in items:
        if isinstance(value, tuple):
            filename, body, *rest = value
            if isinstance(body, (str, os.PathLike)):
                body = open(body, "rb")  # noqa: SIM115 - closed by the caller after the send
                opened.append(body)
            out.append((name, (filename, body, *rest)))
        elif isinstance(value, (str, os.PathLike)):
            handle = open(value, "rb")  # noqa: SIM115
            opened.append(handle)
            out.append((name, (os.path.basename(os.fspath(value)), handle, "application/octet-stream")))
        elif isinstance(value, (bytes, bytearray, memoryview)):
            out.append((name, (name, bytes(value), "application/octet-stream")))
        else:  # an open binary file: httpx reads it in chunks, from the start (it seeks to 0)
            filename = os.path.basename(getattr(value, "name", name) or name)
            out.append((name, (filename, value, "application/octet-stream")))
    return out


def _is_proxy_rejection(response: httpx.Response) -> bool:
    return response.status_code == 400 and not response.content


class Transport:
    """The HTTP side of one holder: base URL, credential, default headers and httpx clients."""

    def __init__(self, base_url: str, api_key: str, default_headers_overrides: Mapping[str, str] | None = None):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.default_headers_overrides = dict(default_headers_overrides or {})
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._transports: dict[str, httpx.AsyncBaseTransport] = {}  # each client's, for _send
        self._pid = os.getpid()
        headers = _platform_headers()
        for env_name, header in (("CLOUDFLARE_ACCESS_CLIENT_ID", "CF-Access-Client-Id"),
                                 ("CLOUDFLARE_ACCESS_CLIENT_SECRET", "CF-Access-Client-Secret")):
            if os.environ.get(env_name):
                headers[header] = os.environ[env_name]
        headers.update(self.default_headers_overrides)
        self._default_headers = headers
        self._client_headers: dict[str, str] = {}  # httpx's client defaults (accept-encoding, connection, ...)
        # Set by the holder in JWT mode: re-exchange the credential after a 401 invalid_token.
        self.reauthenticate: Callable[[], Awaitable[None]] | None = None

    def client(self, purpose: str) -> httpx.AsyncClient:
        """The httpx client for one purpose; each purpose has its own connection pool."""
        if self._pid != os.getpid():  # a forked child cannot use the parent's connections
            self._clients, self._transports, self._pid = {}, {}, os.getpid()
        client = self._clients.get(purpose)
        if client is None:
            limits = httpx.Limits(max_connections=1000, max_keepalive_connections=20)
            transport = _pyqwest_transport() if _uses_pyqwest(purpose) else \
                httpx.AsyncHTTPTransport(http2=True, limits=limits)
            client = httpx.AsyncClient(
                limits=limits,
                timeout=httpx.Timeout(DEFAULT_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
                follow_redirects=True,
                transport=transport,
            )
            self._clients[purpose] = client
            self._transports[purpose] = transport
            self._client_headers = dict(client.headers)
        return client

    async def _send(self, purpose: str, request: httpx.Request, follow_redirects: bool) -> httpx.Response:
        """What `client.send(request)` answers, sent straight to the client's transport where no proxy
        is configured: AsyncClient.send also runs auth and redirect handling the SDK does not use,
        and parses every response's cookies into a jar (http.cookiejar: ~70 us a request). Cookies a
        server sets are still kept; a redirect (which Tinker servers do not send) is sent again
        through client.send, which follows it."""
        client = self._clients[purpose]
        if _PROXIED:
            return await client.send(request, follow_redirects=follow_redirects)
        response = await self._transports[purpose].handle_async_request(request)
        response.request = request
        try:
            await response.aread()
        finally:
            await response.aclose()
        if "set-cookie" in response.headers:
            client.cookies.extract_cookies(response)
        if follow_redirects and response.is_redirect:
            return await client.send(request, follow_redirects=True)
        return response

    def url(self, path: str) -> str:
        if path.startswith("http://") or path.startswith("https://"):
            return path
        return f"{self.base_url}/{path.lstrip('/')}"

    def headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = dict(self._default_headers)
        headers["x-api-key"] = self.api_key
        method = current_sdk_method.get()
        if method:
            headers["x-sdk-version"] = PROTOCOL_SDK_VERSION
            headers["x-sdk-method"] = method
        if extra:
            headers.update(extra)
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        purpose: str = "session",
        json: Any = None,
        content: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        max_retries: int = 10,
        idempotency_key: str | None = None,
        follow_redirects: bool = True,
        files: Any = None,
        data: Mapping[str, Any] | None = None,
    ) -> httpx.Response:
        """Send one call (with its retries) and return the successful response, or raise typed.

        `files` (with optional form fields in `data`) sends a multipart/form-data body instead of
        JSON: a mapping or list of (field name, value), where a value is a path, bytes, an open binary
        file, or a tuple `(filename, content[, content_type[, headers]])`. Files are streamed from
        disk in chunks, and re-read from the start on each retry.
        """
        kind = request_kind(path)
        _metrics.REGISTRY.add_gauge("tinkex_http_requests_in_flight", 1, kind=kind)
        try:
            with _telemetry.span(f"tinkex.http {kind}", error_level=logging.DEBUG,
                                 **{"http.request.method": method.upper(), "tinkex.request_kind": kind}) as span:
                return await self._request(method, path, kind, span, purpose=purpose, json=json, content=content,
                                           params=params, headers=headers, timeout=timeout,
                                           max_retries=max_retries, idempotency_key=idempotency_key,
                                           follow_redirects=follow_redirects, files=files, data=data)
        finally:
            _metrics.REGISTRY.add_gauge("tinkex_http_requests_in_flight", -1, kind=kind)

    async def _request(self, method: str, path: str, kind: str, span: dict[str, Any], *, purpose: str, json: Any,
                       content: bytes | None, params: Mapping[str, Any] | None, headers: Mapping[str, str] | None,
                       timeout: float | None, max_retries: int, idempotency_key: str | None, follow_redirects: bool,
                       files: Any, data: Mapping[str, Any] | None) -> httpx.Response:
        client = self.client(purpose)
        base_headers = self.headers(headers)
        _telemetry.inject_trace_headers(base_headers)
        if method.upper() != "GET":
            key = idempotency_key or f"stainless-python-retry-{_random_uuid()}"
            base_headers.setdefault("x-idempotency-key", key)
        if files is not None:
            if json is not None or content is not None:
                raise ValueError("a multipart request takes files= and data=, not json= or content=")
        elif json is not None and content is None:
            content = jsonlib.dumps(json, separators=(",", ":")).encode()
            base_headers.setdefault("content-type", "application/json")
        base_headers.setdefault("accept", "application/json")
        http_timeout = httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT_S, timeout or CONNECT_TIMEOUT_S))
        if timeout is not None:
            base_headers["x-stainless-read-timeout"] = str(timeout)
        url = self.url(path)
        attempt = 0
        reauthenticated = False
        while True:
            request_headers = dict(base_headers)
            request_headers["x-stainless-retry-count"] = str(attempt)
            opened: list[Any] = []
            try:
                if files is not None:
                    request = client.build_request(method, url, params=params, headers=request_headers,
                                                   timeout=http_timeout, files=multipart_files(files, opened),
                                                   data=dict(data or {}))
                elif params or client.cookies or _PROXIED:
                    request = client.build_request(method, url, content=content, params=params,
                                                   headers=request_headers, timeout=http_timeout)
                else:  # what build_request would make, without its general merging (~45 us -> ~15 us)
                    request = httpx.Request(method, _parsed_url(url), content=content,
                                            headers={**self._client_headers, **request_headers},
                                            extensions={"timeout": http_timeout.as_dict()})
                response: httpx.Response | None = None
                error: Exception | None = None
                started = time.perf_counter()
                try:
                    response = await self._send(purpose, request, follow_redirects)
                except httpx.TimeoutException:
                    error = APITimeoutError(request)
                except httpx.TransportError as exc:
                    error = APIConnectionError(request, f"Connection error: {type(exc).__name__}: {exc}")
            finally:
                for handle in opened:
                    handle.close()
            elapsed = time.perf_counter() - started
            status = str(response.status_code) if response is not None else (
                "timeout" if isinstance(error, APITimeoutError) else "connection_error")
            _metrics.REGISTRY.increment("tinkex_http_requests_total", kind=kind, method=method.upper(), status=status)
            _metrics.REGISTRY.observe("tinkex_http_request_duration_seconds", elapsed, kind=kind)
            span["http.response.status_code"] = status
            span["tinkex.retry_count"] = attempt
            _telemetry.emit(_telemetry.HTTP_REQUEST, duration_s=elapsed, method=method.upper(), kind=kind,
                            status=status, attempt=attempt)
            if response is not None:
                self._log_deprecation(response)
                if response.is_success or (not follow_redirects and response.is_redirect):
                    return response
                if (response.status_code == 401 and self.reauthenticate is not None and not reauthenticated
                        and 'error="invalid_token"' in response.headers.get("www-authenticate", "")):
                    reauthenticated = True
                    await self.reauthenticate()
                    base_headers["x-api-key"] = self.api_key
                    continue
                if _is_proxy_rejection(response):
                    error = APIConnectionError(request, "Connection error: empty 400 (request rejected by a proxy)")
                else:
                    retryable = should_retry_status(response)
                    if not retryable or attempt >= max_retries:
                        raise make_status_error(response)
                    error = None
            if error is not None and attempt >= max_retries:
                raise error
            delay = retry_delay(attempt, response)
            logger.debug("retrying %s %s in %.2fs (attempt %d, %s)", method, path, delay, attempt + 1,
                         response.status_code if response is not None else type(error).__name__)
            _metrics.REGISTRY.increment("tinkex_http_retries_total", kind=kind, reason=status)
            _telemetry.emit(_telemetry.HTTP_RETRY, level=logging.INFO if attempt >= 2 else logging.DEBUG,
                            method=method.upper(), kind=kind, reason=status, attempt=attempt + 1,
                            delay_s=round(delay, 3))
            attempt += 1
            await asyncio.sleep(delay)

    @staticmethod
    def _log_deprecation(response: httpx.Response) -> None:
        note = response.headers.get("x-deprecation-note")
        if note:
            level = logging.ERROR if response.headers.get("x-deprecation-level") == "error" else logging.WARNING
            logger.log(level, "server deprecation note: %s", note)

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                await client.aclose()
            except Exception:
                pass
