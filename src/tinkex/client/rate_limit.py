"""Rate limiting shared by every sampler of one tenant: one backoff per (base URL, API key).

A 429 answer to a sample submission is backpressure. Whichever SamplingClient sees it, the
tenant's limiter enters a backoff window (the server's Retry-After when it gives one, else 1 s, or
5 s for a prompt over 128 KiB), and every sampler of that tenant in this process -- from any
ServiceClient -- waits it out before sending anything new. For the window and 10 s after it the
tenant is *throttled*: at most `throttled_concurrency` samples in flight instead of
`max_concurrency`, and each sample charges 20x its estimated bytes against the byte budget.
Different API keys, or different servers, have separate limiters and never slow each other.

    from tinkex.client import rate_limit
    rate_limit.configure(base_url, api_key, rate_limit.RateLimitConfig(max_concurrency=64))
    limiter = rate_limit.limiter_for(base_url, api_key)
    limiter.stats()   # backoffs, waits, in flight, peaks...

A sample holds its slot from submission to result. A sample larger than the whole byte budget is
let through alone, so that it cannot wait forever.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import metrics as _metrics
from . import telemetry as _telemetry

logger = logging.getLogger("tinkex")


@dataclass(frozen=True)
class RateLimitConfig:
    max_concurrency: int = 400  # samples in flight per tenant
    throttled_concurrency: int = 10  # ... while throttled
    byte_budget: int = 10 * 1024 * 1024  # estimated prompt bytes in flight per tenant
    throttled_byte_multiplier: float = 20.0  # each sample's charge while throttled
    backoff_s: float = 1.0  # backoff after a 429 without Retry-After
    large_backoff_s: float = 5.0  # ... for a prompt over large_request_bytes
    large_request_bytes: int = 128 * 1024
    throttle_tail_s: float = 10.0  # stay throttled this long after the backoff window
    respect_retry_after: bool = True  # use the server's Retry-After / retry-after-ms when it gives one

    def __post_init__(self) -> None:
        if self.max_concurrency < 1 or self.throttled_concurrency < 1:
            raise ValueError("concurrency limits must be at least 1")
        if self.byte_budget < 1 or self.throttled_byte_multiplier < 1:
            raise ValueError("byte_budget must be positive and throttled_byte_multiplier at least 1")
        if min(self.backoff_s, self.large_backoff_s, self.throttle_tail_s) < 0:
            raise ValueError("backoff times cannot be negative")


def normalize_base_url(base_url: str) -> str:
    """Lower-case scheme and host, default ports and trailing slashes dropped; the path is kept."""
    parts = urlsplit(base_url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port
    if port is not None and not ((scheme == "http" and port == 80) or (scheme == "https" and port == 443)):
        host = f"{host}:{port}"
    return urlunsplit((scheme, host, parts.path.rstrip("/"), "", ""))


class _Slot:
    __slots__ = ("weight",)

    def __init__(self, weight: float):
        self.weight = weight


class TenantRateLimiter:
    """The backoff window, concurrency limit and byte budget of one (base URL, API key)."""

    def __init__(self, base_url: str, key_hash: str, config: RateLimitConfig | None = None):
        self.base_url = base_url
        self.tenant = key_hash[:12]
        self.config = config or RateLimitConfig()
        self._lock = threading.Lock()
        self._backoff_until = 0.0
        self._throttled_until = 0.0
        self._in_flight = 0
        self._bytes_in_flight = 0.0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._stats = {"backoffs": 0, "waited": 0, "admitted": 0, "admitted_throttled": 0, "peak_in_flight": 0,
                       "peak_in_flight_throttled": 0, "peak_bytes_in_flight": 0.0}

    # ---- state -------------------------------------------------------------------------------

    def backoff_remaining(self) -> float:
        return max(0.0, self._backoff_until - time.monotonic())

    def throttled(self) -> bool:
        return time.monotonic() < self._throttled_until

    def limits(self) -> tuple[int, float]:
        """(concurrency limit, byte multiplier) in force now."""
        if self.throttled():
            return self.config.throttled_concurrency, self.config.throttled_byte_multiplier
        return self.config.max_concurrency, 1.0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            stats = dict(self._stats)
            stats.update(in_flight=self._in_flight, bytes_in_flight=self._bytes_in_flight,
                         backoff_remaining_s=self.backoff_remaining(), throttled=self.throttled())
        return stats

    def backoff_for(self, response: Any, request_bytes: int) -> float:
        """The pause after a 429 to a request of `request_bytes`: the server's, or the configured one."""
        if self.config.respect_retry_after and response is not None:
            from ._transport import server_retry_after

            hinted = server_retry_after(response)
            if hinted is not None:
                return hinted
        return self.config.large_backoff_s if request_bytes > self.config.large_request_bytes else self.config.backoff_s

    def backoff(self, seconds: float, *, reason: str = "429") -> None:
        """Start (or extend) the tenant's backoff window; throttle for it plus the tail."""
        now = time.monotonic()
        with self._lock:
            self._backoff_until = max(self._backoff_until, now + seconds)
            self._throttled_until = max(self._throttled_until, self._backoff_until + self.config.throttle_tail_s)
            self._stats["backoffs"] += 1
        _metrics.REGISTRY.increment("tinkex_sample_backoffs_total")
        _telemetry.emit(_telemetry.RATE_LIMIT_BACKOFF, level=logging.INFO, base_url=self.base_url,
                        tenant=self.tenant, backoff_s=round(seconds, 3), reason=reason)
        self._wake_all()

    # ---- admission ---------------------------------------------------------------------------

    def _try_admit(self, request_bytes: int) -> tuple[_Slot | None, float | None]:
        """Admit now, or say how long to wait at most before trying again (None: until a release)."""
        now = time.monotonic()
        with self._lock:
            if now < self._backoff_until:
                return None, self._backoff_until - now
            throttled = now < self._throttled_until
            limit = self.config.throttled_concurrency if throttled else self.config.max_concurrency
            weight = request_bytes * (self.config.throttled_byte_multiplier if throttled else 1.0)
            fits = self._bytes_in_flight == 0 or self._bytes_in_flight + weight <= self.config.byte_budget
            if self._in_flight < limit and fits:
                self._in_flight += 1
                self._bytes_in_flight += weight
                stats = self._stats
                stats["admitted"] += 1
                stats["peak_in_flight"] = max(stats["peak_in_flight"], self._in_flight)
                stats["peak_bytes_in_flight"] = max(stats["peak_bytes_in_flight"], self._bytes_in_flight)
                if throttled:
                    stats["admitted_throttled"] += 1
                    stats["peak_in_flight_throttled"] = max(stats["peak_in_flight_throttled"], self._in_flight)
                return _Slot(weight), None
            # a throttled limit loosens when the throttle ends, even if nothing is released
            return None, (self._throttled_until - now) if throttled else None

    async def acquire(self, request_bytes: int) -> _Slot:
        slot, wait = self._try_admit(request_bytes)
        if slot is not None:
            return slot
        started = time.perf_counter()
        with self._lock:
            self._stats["waited"] += 1
        loop = asyncio.get_running_loop()
        try:
            while slot is None:
                future: asyncio.Future[None] = loop.create_future()
                entry = (loop, future)
                with self._lock:
                    self._waiters.append(entry)
                try:
                    # re-check after registering, so a release in between is not missed
                    slot, wait = self._try_admit(request_bytes)
                    if slot is not None:
                        break
                    try:
                        await asyncio.wait_for(future, timeout=wait)
                    except asyncio.TimeoutError:
                        pass
                finally:
                    with self._lock:
                        if entry in self._waiters:
                            self._waiters.remove(entry)
                slot, wait = self._try_admit(request_bytes)
            return slot
        finally:
            _metrics.REGISTRY.observe("tinkex_rate_limit_wait_seconds", time.perf_counter() - started)

    def release(self, slot: _Slot) -> None:
        with self._lock:
            self._in_flight -= 1
            self._bytes_in_flight = max(0.0, self._bytes_in_flight - slot.weight)
        self._wake_all()

    def _wake_all(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_set_if_pending, future)
            except RuntimeError:  # that loop is closed
                pass

    @asynccontextmanager
    async def slot(self, request_bytes: int) -> AsyncIterator[None]:
        """Hold a place for one sample of `request_bytes` (waits for the backoff and the budgets)."""
        taken = await self.acquire(request_bytes)
        try:
            yield
        finally:
            self.release(taken)

    async def wait_for_backoff(self) -> None:
        """Sleep until the tenant's backoff window is over (it may be extended meanwhile)."""
        remaining = self.backoff_remaining()
        if remaining <= 0:
            return
        started = time.perf_counter()
        while remaining > 0:
            await asyncio.sleep(min(remaining, 1.0))
            remaining = self.backoff_remaining()
        with self._lock:
            self._stats["waited"] += 1
        _metrics.REGISTRY.observe("tinkex_rate_limit_wait_seconds", time.perf_counter() - started)

    def __repr__(self) -> str:
        return f"TenantRateLimiter(base_url={self.base_url!r}, tenant={self.tenant!r})"


def _set_if_pending(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# ---- the registry -------------------------------------------------------------------------------

_registry_lock = threading.Lock()
_limiters: dict[tuple[int, str, str], TenantRateLimiter] = {}
_configs: dict[tuple[str, str], RateLimitConfig] = {}


def _key(base_url: str, api_key: str) -> tuple[str, str]:
    return normalize_base_url(base_url), hashlib.sha256(api_key.encode()).hexdigest()


def limiter_for(base_url: str, api_key: str) -> TenantRateLimiter:
    """The limiter every sampler of this (base URL, API key) in this process shares."""
    url, key_hash = _key(base_url, api_key)
    with _registry_lock:
        limiter = _limiters.get((os.getpid(), url, key_hash))
        if limiter is None:
            limiter = TenantRateLimiter(url, key_hash, _configs.get((url, key_hash)))
            _limiters[(os.getpid(), url, key_hash)] = limiter
        return limiter


def configure(base_url: str, api_key: str, config: RateLimitConfig | None = None, **changes: Any) -> RateLimitConfig:
    """Set the limits of one tenant (a whole config, or some fields changed from the current one)."""
    url, key_hash = _key(base_url, api_key)
    limiter = limiter_for(base_url, api_key)
    new = replace(config or limiter.config, **changes)
    with _registry_lock:
        _configs[(url, key_hash)] = new
    limiter.config = new
    limiter._wake_all()
    return new
