"""APIFuture, and the retrieve_future long-poll loop that turns a request id into its result.

An APIFuture wraps work running on the SDK's event loop. It is usable from synchronous code
(`.result(timeout)`) and from any asyncio loop (`await future`, `await future.result_async()`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from ..types._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    RequestFailedError,
)
from . import _loop
from . import metrics as _metrics
from ._constants import RETRIEVE_FUTURE_TIMEOUT_S
from ._transport import current_sdk_method, parse_body

if TYPE_CHECKING:
    from ._holder import Holder

T = TypeVar("T")
logger = logging.getLogger("tinkex")


class RetryableException(Exception):
    """A failure after which the whole operation may be sent again (e.g. an expired promise)."""


class APIFuture(ABC, Generic[T]):
    """The eventual result of an SDK operation."""

    @abstractmethod
    async def result_async(self, timeout: float | None = None) -> T: ...

    @abstractmethod
    def result(self, timeout: float | None = None) -> T: ...

    @abstractmethod
    def future(self) -> concurrent.futures.Future[T]: ...

    async def coroutine(self) -> T:
        return await self.result_async()

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()


class AwaitableConcurrentFuture(APIFuture[T]):
    """An APIFuture over a `concurrent.futures.Future` that is completed on the SDK loop."""

    def __init__(self, future: concurrent.futures.Future[T]):
        self._future = future

    def result(self, timeout: float | None = None) -> T:
        if _loop.on_sdk_loop():
            raise RuntimeError("APIFuture.result() was called on the SDK's event loop; use `await` there")
        try:
            asyncio.get_running_loop()
            logger.warning("APIFuture.result() blocks a running event loop; prefer `await future` in async code")
        except RuntimeError:
            pass
        return self._future.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        wrapped = asyncio.shield(asyncio.wrap_future(self._future))
        if timeout is None:
            return await wrapped
        return await asyncio.wait_for(wrapped, timeout)

    def future(self) -> concurrent.futures.Future[T]:
        return self._future

    # The concurrent.futures.Future methods, for code that treated these as plain futures.
    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> bool:
        return self._future.cancel()

    def cancelled(self) -> bool:
        return self._future.cancelled()

    def running(self) -> bool:
        return self._future.running()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._future.exception(timeout)

    def add_done_callback(self, fn: Callable[[Any], Any]) -> None:
        self._future.add_done_callback(lambda _f: fn(self))


def run_in_sdk_loop(coro: Coroutine[Any, Any, T]) -> AwaitableConcurrentFuture[T]:
    """Start a coroutine on the SDK loop now and return its future."""
    return AwaitableConcurrentFuture(_loop.submit(coro))


def completed_future(value: T) -> AwaitableConcurrentFuture[T]:
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    future.set_result(value)
    return AwaitableConcurrentFuture(future)


def sdk_method(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a public method: requests sent while it runs carry `x-sdk-method: name` (outermost wins)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                token = current_sdk_method.set(name) if current_sdk_method.get() is None else None
                try:
                    return await fn(*args, **kwargs)
                finally:
                    if token is not None:
                        current_sdk_method.reset(token)
            return async_wrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            token = current_sdk_method.set(name) if current_sdk_method.get() is None else None
            try:
                return fn(*args, **kwargs)
            finally:
                if token is not None:
                    current_sdk_method.reset(token)
        return wrapper

    return decorate


# ---- the long-poll loop -------------------------------------------------------------------------

_COMBINED: dict[type, type] = {}


def _fatal(error: APIStatusError) -> APIStatusError:
    """A non-retryable polling status: the typed error, which is also a ValueError as in tinker."""
    cls = type(error)
    combined = _COMBINED.get(cls)
    if combined is None:
        combined = type(cls.__name__, (cls, ValueError), {"__module__": cls.__module__})
        _COMBINED[cls] = combined
    return combined(f"Error retrieving result: {error.message}", response=error.response, body=error.body)


QueueObserver = Callable[[str, str | None], None]


def _timed(poll: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Times each poll into the `tinkex_future_duration_seconds` histogram, by request type and outcome."""

    @functools.wraps(poll)
    async def timed(holder: Holder, request_id: str, request_type: str, **options: Any) -> Any:
        started = time.perf_counter() - (options.get("roundtrip_s") or 0.0)
        outcome = "error"
        try:
            result = await poll(holder, request_id, request_type, **options)
            outcome = "ok"
            return result
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except RetryableException:
            outcome = "expired"
            raise
        finally:
            _metrics.REGISTRY.observe("tinkex_future_duration_seconds", time.perf_counter() - started,
                                      request_type=request_type, outcome=outcome)

    return timed


@_timed
async def poll_result(
    holder: Holder,
    request_id: str,
    request_type: str,
    *,
    result_model: type[BaseModel] | None = None,
    proto_decoder: Callable[[bytes], Any] | None = None,
    roundtrip_s: float | None = None,
    on_queue_state: QueueObserver | None = None,
    purpose: str = "retrieve",
) -> Any:
    """Poll `POST /api/v1/retrieve_future` until the request finishes; return the decoded result.
    `purpose` picks the transport's connection pool (sampling polls ride with their asample calls).

    try_again answers are re-polled at once (the server long-polls); a metadata-only answer is
    followed by a full fetch; `{"error": ...}` raises RequestFailedError; 408 and 5xx are re-polled,
    429 and connection errors back off min(2**k, 30) s; a 400 is retried 3 times; 402 waits out
    the billing pause; 410 raises RetryableException; other statuses are fatal.
    """
    transport = holder.transport
    allow_metadata_only = True
    iteration = 0
    connection_failures = 0
    rate_limited = 0
    server_errors = 0
    bad_requests = 0
    billing_started: float | None = None
    base_headers = {"X-Tinker-Request-Type": request_type, "X-Stainless-Raw-Response": "raw"}
    if proto_decoder is not None:
        base_headers["accept"] = "application/x-protobuf"
    while True:
        headers = dict(base_headers)
        headers["X-Tinker-Request-Iteration"] = str(iteration)
        if iteration == 0 and roundtrip_s is not None:
            headers["X-Tinker-Create-Promise-Roundtrip-Time"] = f"{roundtrip_s:.6f}"
        iteration += 1
        try:
            response = await transport.request(
                "POST", "/api/v1/retrieve_future", purpose=purpose, headers=headers, max_retries=0,
                json={"request_id": request_id, "allow_metadata_only": allow_metadata_only},
                timeout=RETRIEVE_FUTURE_TIMEOUT_S,
            )
        except APIConnectionError:
            await asyncio.sleep(min(2.0**connection_failures, 30.0))
            connection_failures += 1
            continue
        except APIStatusError as error:
            connection_failures = 0
            status = error.status_code
            if status == 408:
                bad_requests = 0
                _observe(error.body, on_queue_state)
                continue
            if status >= 500:
                # Re-poll at once; a short growing pause keeps a persistently failing server from a hot loop.
                await asyncio.sleep(min(0.05 * 2.0**server_errors, 2.0))
                server_errors += 1
                continue
            if status == 429:
                await asyncio.sleep(min(2.0**rate_limited, 30.0))
                rate_limited += 1
                continue
            if status == 400 and bad_requests < 3:
                bad_requests += 1
                continue
            if status == 402:
                now = time.monotonic()
                billing_started = billing_started or now
                if now - billing_started < holder.client_config.billing_exception_max_pause_duration_sec:
                    await asyncio.sleep(5.0)
                    continue
            if status == 410:
                raise RetryableException(f"Promise expired/broken: {error.message}") from error
            raise _fatal(error) from None
        connection_failures = rate_limited = server_errors = 0
        content_type = response.headers.get("content-type", "")
        if "application/x-protobuf" in content_type:
            if proto_decoder is None:
                raise APIResponseValidationError(response, None, f"unexpected protobuf result for {request_type}")
            try:
                return proto_decoder(response.content)
            except Exception as exc:
                raise APIResponseValidationError(response, None,
                                                 f"could not decode the {request_type} protobuf result: {exc}") from exc
        body = parse_body(response)
        if isinstance(body, dict):
            if body.get("type") == "try_again":
                _observe(body, on_queue_state)
                continue
            if body.get("status") == "complete_metadata":
                if not allow_metadata_only:
                    raise APIResponseValidationError(response, body, "metadata-only answer to a full retrieve")
                allow_metadata_only = False
                continue
            if "error" in body:
                raise RequestFailedError(str(body["error"]), request_id, body.get("category") or "unknown")
        if result_model is None:
            return body
        try:
            return result_model.model_validate(body)
        except ValidationError as exc:
            raise APIResponseValidationError(response, body, f"invalid {request_type} result: {exc}") from exc


def _observe(body: Any, on_queue_state: QueueObserver | None) -> None:
    if on_queue_state is None or not isinstance(body, dict):
        return
    state = body.get("queue_state")
    reason = body.get("queue_state_reason")
    if state is not None or reason is not None:
        try:
            on_queue_state(state or "active", reason)
        except Exception:
            logger.exception("queue state observer failed")


def validate(response: httpx.Response, model: type[BaseModel]) -> Any:
    """A direct JSON response as `model`, or APIResponseValidationError."""
    body = parse_body(response)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise APIResponseValidationError(response, body, f"invalid {model.__name__}: {exc}") from exc


AsyncFn = Callable[[], Awaitable[T]]
