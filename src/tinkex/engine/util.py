"""Small helpers shared by the engine modules."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide transformers' progress bars for one load or save, then restore the caller's setting."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    if was_enabled:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


_MMAP_THRESHOLD, _TRIM_THRESHOLD = -3, -1  # glibc's mallopt parameter numbers (malloc.h)


@functools.cache  # process-wide: once is enough
def keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed tensor memory instead of returning it to the kernel.

    By default glibc serves every block over a (dynamic) threshold of a few hundred KiB with its own
    mmap and unmaps it when freed, so each training step's logits, log-softmax and gradients -- a few
    MiB, allocated fresh every step -- come back as new pages the kernel must fault in and zero: up to
    a fifth of a small model's step on CPU. Keeping blocks up to 32 MiB (glibc's largest threshold)
    in the heap, and up to 256 MiB of free heap before trimming, makes them plain reuse. Process-wide
    and once; a no-op off glibc, or when the user set MALLOC_* / GLIBC_TUNABLES themselves."""
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    mallopt(_MMAP_THRESHOLD, 32 << 20)
    mallopt(_TRIM_THRESHOLD, 256 << 20)
