"""One background asyncio event loop per process; every network coroutine of the SDK runs on it.

Synchronous callers hand coroutines over with `submit()` and get a `concurrent.futures.Future`.
After a fork the child gets a fresh loop (the parent's thread does not exist there).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_pid: int | None = None


def _run(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    loop.run_forever()


def get_loop() -> asyncio.AbstractEventLoop:
    """The SDK's event loop, started on first use (again after a fork)."""
    global _loop, _thread, _pid
    if _loop is not None and _pid == os.getpid() and _thread is not None and _thread.is_alive():
        return _loop
    with _lock:
        if _loop is None or _pid != os.getpid() or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()
            thread = threading.Thread(target=_run, args=(loop, ready), name="tinkex-event-loop", daemon=True)
            thread.start()
            ready.wait()
            _loop, _thread, _pid = loop, thread, os.getpid()
    return _loop


def on_sdk_loop() -> bool:
    """True when the caller runs on the SDK's own loop thread (where blocking would deadlock)."""
    return _thread is not None and threading.current_thread() is _thread and _pid == os.getpid()


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule a coroutine on the SDK loop from any thread."""
    return asyncio.run_coroutine_threadsafe(coro, get_loop())


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run a coroutine on the SDK loop and wait for it (never call this from the SDK loop)."""
    if on_sdk_loop():
        coro.close()
        raise RuntimeError("a blocking tinkex call was made on the SDK's own event loop thread")
    return submit(coro).result(timeout)
