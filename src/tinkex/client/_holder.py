"""The holder: one connection to a server (URL, credential, pools), its config and its session.

A ServiceClient owns a session holder, which creates the session on first use and keeps it alive
with a heartbeat every 10 s. RestClient and AdminClient share a session-less holder per
(base URL, key). An unpickled SamplingClient gets a "shadow" holder that reuses the original
session id and creates nothing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from ..types import AuthTokenResponse, ClientConfigResponse, ClientDynamicConfigResponse, CreateSessionResponse
from ..types._exceptions import APIConnectionError, APIStatusError, NotFoundError
from ._config import Connection, resolve
from ._constants import HEARTBEAT_INTERVAL_S, PROTOCOL_SDK_VERSION, SUBMIT_RETRY_BUDGET_S
from ._futures import AwaitableConcurrentFuture, run_in_sdk_loop, validate
from . import telemetry as _events
from ._telemetry import Telemetry, telemetry_enabled
from ._transport import Transport, current_sdk_method, server_retry_after

logger = logging.getLogger("tinkex")
T = TypeVar("T")


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, (APIConnectionError, asyncio.TimeoutError)):
        return True
    if isinstance(exc, APIStatusError):
        override = exc.response.headers.get("x-should-retry")
        if override in ("true", "false"):
            return override == "true"
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return False


@dataclass(frozen=True)
class HolderConfig:
    """What another process needs to reach the same server (pickled with a SamplingClient)."""

    base_url: str
    api_key: str
    default_headers_overrides: dict[str, str] = field(default_factory=dict)
    client_config: dict[str, Any] | None = None


class Holder:
    def __init__(
        self,
        connection: Connection,
        *,
        with_session: bool,
        default_headers_overrides: Mapping[str, str] | None = None,
        user_metadata: dict[str, str] | None = None,
        project_id: str | None = None,
        display_name: str | None = None,
        session_id: str | None = None,
        client_config: dict[str, Any] | None = None,
    ):
        self.connection = connection
        self.transport = Transport(connection.base_url, connection.api_key, default_headers_overrides)
        self.with_session = with_session
        self.user_metadata = user_metadata
        self.project_id = project_id
        self.display_name = display_name
        self.session_id: str | None = session_id
        self.shadow = session_id is not None
        self.client_config = ClientConfigResponse.model_validate(client_config or {})
        self.dynamic_config = ClientDynamicConfigResponse()
        self._config_fetched = client_config is not None
        self._needs_jwt = self._config_fetched and self._wants_jwt()
        self._ready_lock: asyncio.Lock | None = None
        self._counter_lock = threading.Lock()
        self._model_seq = 0
        self._sampling_seq = 0
        self._custom_loss_seq = 0
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._jwt_task: asyncio.Task[None] | None = None
        self.telemetry: Telemetry | None = Telemetry(self) if telemetry_enabled() else None
        self.closed = False
        self.last_heartbeat_ok: float | None = None
        self.heartbeats_sent = 0
        self._pid = os.getpid()

    # ---- identity ----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.connection.base_url

    def config(self) -> HolderConfig:
        return HolderConfig(base_url=self.connection.base_url, api_key=self.connection.api_key,
                            default_headers_overrides=dict(self.transport.default_headers_overrides),
                            client_config=self.client_config.model_dump(mode="json"))

    # ---- counters (any thread) ---------------------------------------------------------------

    def next_model_seq_id(self) -> int:
        with self._counter_lock:
            value, self._model_seq = self._model_seq, self._model_seq + 1
            return value

    def next_sampling_session_seq_id(self) -> int:
        with self._counter_lock:
            value, self._sampling_seq = self._sampling_seq, self._sampling_seq + 1
            return value

    def next_custom_loss_seq_id(self) -> int:
        with self._counter_lock:
            value, self._custom_loss_seq = self._custom_loss_seq, self._custom_loss_seq + 1
            return value

    # ---- start-up (the SDK loop) -------------------------------------------------------------

    async def ensure_ready(self) -> None:
        """Fetch the server config, and create the session if this holder wants one (once)."""
        if self._config_fetched and not self._needs_jwt and (not self.with_session or self.session_id is not None):
            return
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            token = current_sdk_method.set(None)  # start-up requests are background requests
            try:
                if not self._config_fetched:
                    await self._fetch_config()
                if self._needs_jwt:
                    await self._start_jwt()
                if self.with_session and self.session_id is None:
                    await self._create_session()
            finally:
                current_sdk_method.reset(token)
            if self.telemetry is not None:
                self.telemetry.start()

    async def _fetch_config(self) -> None:
        body = {"sdk_version": PROTOCOL_SDK_VERSION}
        response = await self.transport.request("POST", "/api/v1/client/config", json=body)
        self.client_config = validate(response, ClientConfigResponse)
        try:
            response = await self.transport.request("POST", "/api/v1/client/dynamic_config", json=body,
                                                    timeout=10.0, max_retries=0)
            self.dynamic_config = validate(response, ClientDynamicConfigResponse)
        except NotFoundError:
            pass
        except Exception as exc:
            logger.debug("dynamic config unavailable: %s", exc)
        self._config_fetched = True
        self._needs_jwt = self._wants_jwt()

    def _wants_jwt(self) -> bool:
        return self.client_config.pjwt_auth_enabled and not self.connection.api_key.startswith("eyJ")

    async def _start_jwt(self) -> None:
        await self._exchange_jwt()
        self.transport.reauthenticate = self._exchange_jwt
        self._jwt_task = asyncio.get_running_loop().create_task(self._refresh_jwt())
        self._needs_jwt = False

    async def _exchange_jwt(self) -> None:
        """JWT mode: trade the raw credential for a short-lived JWT, used from then on as the key."""
        raw = Transport(self.connection.base_url, self.connection.api_key,
                        self.transport.default_headers_overrides)
        try:
            response = await raw.request("POST", "/api/v1/auth/token", json={})
        finally:
            await raw.aclose()
        self.transport.api_key = validate(response, AuthTokenResponse).jwt

    async def _refresh_jwt(self) -> None:
        while not self.closed:
            lifetime = _jwt_lifetime(self.transport.api_key)
            await asyncio.sleep(max(30.0, lifetime * random.uniform(0.45, 0.55)) if lifetime else 600.0)
            try:
                await self._exchange_jwt()
            except Exception as exc:
                logger.warning("JWT refresh failed (retrying in 60 s): %s", exc)
                await asyncio.sleep(60.0)

    async def _create_session(self) -> None:
        tags = sorted({tag.strip() for tag in os.environ.get("TINKER_TAGS", "").split(",") if tag.strip()})
        body: dict[str, Any] = {"tags": tags, "user_metadata": self.user_metadata or {},
                                "sdk_version": PROTOCOL_SDK_VERSION, "type": "create_session"}
        if self.project_id:
            body["project_id"] = self.project_id
        if self.display_name:
            body["display_name"] = self.display_name
        response = await self.execute_with_retries(
            lambda: self.transport.request("POST", "/api/v1/create_session", json=body))
        created = validate(response, CreateSessionResponse)
        for message, level in ((created.info_message, logging.INFO), (created.warning_message, logging.WARNING),
                               (created.error_message, logging.ERROR)):
            if message:
                logger.log(level, "%s", message)
        self.session_id = created.session_id
        if self.telemetry is not None:
            self.telemetry.session_start()
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        last_ok = time.monotonic()
        warned = False
        while not self.closed:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            if self.closed:
                return
            try:
                await self.transport.request("POST", "/api/v1/session_heartbeat", timeout=10.0, max_retries=0,
                                             json={"session_id": self.session_id, "type": "session_heartbeat"})
                self.heartbeats_sent += 1
                last_ok = self.last_heartbeat_ok = time.monotonic()
                warned = False
            except APIStatusError as exc:
                if exc.status_code == 410:
                    logger.warning("session %s has finished on the server; heartbeats stop", self.session_id)
                    return
            except Exception:
                pass
            if not warned and time.monotonic() - last_ok > 120:
                logger.warning("no successful session heartbeat for over 120 s")
                warned = True

    # ---- running operations -------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> AwaitableConcurrentFuture[T]:
        """Start an operation on the SDK loop; an exception that reaches the user is also reported
        to telemetry (as a user error for 4xx and user-category failures, else as unhandled)."""
        return run_in_sdk_loop(self._tracked(coro))

    async def _tracked(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return await coro
        except Exception as exc:
            if self.telemetry is not None:
                self.telemetry.exception(exc)
            raise

    # ---- retries around submits --------------------------------------------------------------

    async def execute_with_retries(self, fn: Callable[[], Awaitable[T]], *, budget_s: float = SUBMIT_RETRY_BUDGET_S) -> T:
        """Retry connection errors, timeouts and 408/409/429/5xx for up to `budget_s`, min(2**n, 30) s apart.

        A 402 waits out the billing pause (5 s at a time, up to the server's configured maximum).
        """
        start = time.monotonic()
        attempt = 0
        billing_started: float | None = None
        while True:
            error: BaseException
            try:
                return await fn()
            except APIStatusError as exc:
                error = exc
                if exc.status_code == 402:
                    now = time.monotonic()
                    billing_started = billing_started or now
                    if now - billing_started < self.client_config.billing_exception_max_pause_duration_sec:
                        await asyncio.sleep(5.0)
                        continue
                    raise
                if not is_retryable(exc) or time.monotonic() - start > budget_s:
                    raise
                self._log_retry(exc, attempt)
            except (APIConnectionError, asyncio.TimeoutError) as exc:
                error = exc
                if time.monotonic() - start > budget_s:
                    raise
                self._log_retry(exc, attempt)
            await asyncio.sleep(_delay_for(error, attempt))
            attempt += 1

    def _log_retry(self, exc: BaseException, attempt: int) -> None:
        logger.debug("retrying after %s (attempt %d)", exc, attempt + 1)
        _events.emit(_events.HTTP_RETRY, level=logging.INFO if attempt >= 2 else logging.DEBUG, layer="submit",
                     reason=type(exc).__name__, status=getattr(exc, "status_code", None), attempt=attempt + 1)
        if self.telemetry is not None:
            self.telemetry.generic("InternalClientHolder.execute_with_retries.exception",
                                   {"exception": str(exc), "exception_type": type(exc).__name__,
                                    "attempt_count": attempt + 1,
                                    "status_code": getattr(exc, "status_code", None)}, severity="WARNING")

    # ---- shutdown ----------------------------------------------------------------------------

    async def close(self, status: str = "success", detail: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.with_session and self.session_id is not None and not self.shadow:
            try:
                await self.transport.request(
                    "POST", f"/api/v1/sessions/{self.session_id}/finish", timeout=10.0, max_retries=2,
                    json={"reason": {"type": status}, "detail": detail})
            except Exception as exc:
                logger.warning("could not finish session %s: %s", self.session_id, exc)
        if self._jwt_task is not None:
            self._jwt_task.cancel()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            try:
                await self._heartbeat_task
            except (asyncio.CancelledError, Exception):
                pass
        if self.telemetry is not None:
            await self.telemetry.close()
        await self.transport.aclose()


def _jwt_lifetime(token: str) -> float | None:
    """exp - iat of a JWT, in seconds (signatures are not checked on the client)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"]) - float(claims["iat"])
    except (IndexError, KeyError, TypeError, ValueError):
        return None


def _delay_for(error: BaseException, attempt: int) -> float:
    """The server's Retry-After when it gave one in (0, 60] s, else min(2**attempt, 30) s."""
    response = getattr(error, "response", None)
    from_server = server_retry_after(response) if response is not None else None
    return from_server if from_server is not None else min(2.0**attempt, 30.0)


# ---- process-wide caches ------------------------------------------------------------------------

_cache_lock = threading.Lock()
_sessionless: dict[tuple[int, str, str], Holder] = {}
_shadows: dict[tuple[int, str, str], weakref.ref[Holder]] = {}


def sessionless_holder(base_url: str | None = None, api_key: str | None = None) -> Holder:
    """The shared session-less holder for this (base URL, key), for REST and admin calls."""
    connection = resolve(base_url, api_key)
    key = (os.getpid(), connection.base_url, hashlib.sha256(connection.api_key.encode()).hexdigest())
    with _cache_lock:
        holder = _sessionless.get(key)
        if holder is None or holder.closed:
            holder = Holder(connection, with_session=False)
            _sessionless[key] = holder
        return holder


def shadow_holder(session_id: str, config: HolderConfig) -> Holder:
    """A holder in another process that reuses an existing session (for unpickled samplers)."""
    key = (os.getpid(), session_id, json.dumps(asdict(config), sort_keys=True))
    with _cache_lock:
        ref = _shadows.get(key)
        holder = ref() if ref is not None else None
        if holder is None or holder.closed:
            connection = Connection(base_url=config.base_url, api_key=config.api_key)
            holder = Holder(connection, with_session=True, session_id=session_id,
                            default_headers_overrides=config.default_headers_overrides,
                            client_config=config.client_config)
            _shadows[key] = weakref.ref(holder)
        return holder
