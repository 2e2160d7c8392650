"""Checkpoint download: streamed to disk in constant memory, verified, extracted, resumable.

`RestClient.download_checkpoint(tinker_path, output_dir)` (or `tinkex checkpoint download`) puts
a checkpoint in `output_dir/<run>_<kind>_<name>/`:

- a training or sampler checkpoint comes as one .tar.gz archive, written to
  `<name>.tar.gz.part` in blocks of at most `memory_budget` bytes (the whole download never holds
  more than that in memory), then extracted;
- an external (Hugging Face) export comes file by file into `<name>.part/`.

Verification: every body is checked against the SHA-256 the server sends (`X-Tinkex-Sha256`, also
the ETag), and after extraction every file listed in the checkpoint's own `tinkex_state.json` is
checked against the size and SHA-256 recorded there when it was saved.

Memory: `memory_budget` is the largest block tinkex holds (reading the body, hashing, writing);
the HTTP client adds a fixed read buffer (64 KiB), the gzip reader 128 KiB. Neither grows with the
checkpoint. Bodies are read in a worker thread, so the SDK's event loop is never blocked on disk.

Resuming: an interrupted download leaves its `.part` file(s) and a small `.part.json` with the
ETag. The next call for the same checkpoint asks for the rest with `Range: bytes=N-` and
`If-Range: <etag>`; if the checkpoint changed meanwhile, the server sends it whole again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import httpx

from ..types import ParsedCheckpointTinkerPath
from ..types._exceptions import TinkerError
from . import metrics as _metrics
from . import telemetry as _telemetry

if TYPE_CHECKING:
    from .rest_client import RestClient

Progress = Callable[[int, int | None], None]
DEFAULT_MEMORY_BUDGET = 1 << 20
MIN_MEMORY_BUDGET = 4096
STATE_FILE = "tinkex_state.json"


class DownloadError(TinkerError):
    """A download failed (HTTP error, or the server's answer does not fit the request)."""


class ChecksumMismatch(DownloadError):
    """What arrived is not what the server (or the checkpoint's tinkex_state.json) says it should be."""


@dataclass
class _Fetched:
    bytes_written: int  # bytes of the body received by this call
    resumed_from: int  # bytes that were already on disk and kept
    size: int
    sha256: str | None


def target_dir(tinker_path: str, output_dir: str | os.PathLike[str] | None) -> Path:
    """`output_dir/<tinker path without tinker://, '/' replaced by '_'>`."""
    ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
    return Path(output_dir or ".") / tinker_path[len("tinker://"):].replace("/", "_")


def rich_progress(description: str) -> tuple[Progress, Callable[[], None]]:
    """A progress bar on stderr (rich); returns (callback, close)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress as RichProgress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.console import Console

    bar = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeRemainingColumn(), console=Console(stderr=True), transient=False)
    task = bar.add_task(description, total=None)
    bar.start()

    def update(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)

    return update, bar.stop


async def download_checkpoint(rest: RestClient, tinker_path: str, output_dir: str | os.PathLike[str] | None = None,
                              *, force: bool = False, progress: Progress | bool | None = None, resume: bool = True,
                              verify: bool = True, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Path:
    """Download, verify and extract a checkpoint; return its directory (see the module docs)."""
    if memory_budget < MIN_MEMORY_BUDGET:
        raise ValueError(f"memory_budget must be at least {MIN_MEMORY_BUDGET} bytes")
    parsed = ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
    target = target_dir(tinker_path, output_dir)
    if target.exists():
        if not force:
            raise FileExistsError(f"{target} exists (pass force=True to replace it)")
        shutil.rmtree(target)
    close: Callable[[], None] | None = None
    if progress is True:
        progress, close = rich_progress(f"{parsed.checkpoint_id}")
    elif progress is False:
        progress = None
    started = time.perf_counter()
    try:
        with _telemetry.span(_telemetry.DOWNLOAD, tinker_path=tinker_path, resume=resume) as attrs:
            # Bodies are read by a blocking client in a worker thread: the SDK's event loop stays free,
            # and nothing reads ahead of the disk (an asyncio transport buffers up to 256 KiB per read).
            with httpx.Client(follow_redirects=True, timeout=httpx.Timeout(300, connect=10),
                              verify=_ssl_context()) as client:
                fetcher = _Fetcher(rest, client, progress, memory_budget, resume)
                if parsed.checkpoint_type == "external":
                    await _download_files(rest, fetcher, tinker_path, target, verify)
                else:
                    await _download_archive(rest, fetcher, tinker_path, target, verify)
            attrs.update(bytes=fetcher.received, resumed_from=fetcher.resumed, target=str(target))
        _metrics.REGISTRY.increment("tinkex_download_bytes_total", fetcher.received)
        return target
    finally:
        _metrics.REGISTRY.observe("tinkex_download_duration_seconds", time.perf_counter() - started)
        if close is not None:
            close()


class _Fetcher:
    """Streams URLs to files, resuming from .part files, in blocks of at most `budget` bytes."""

    def __init__(self, rest: RestClient, client: httpx.Client, progress: Progress | None, budget: int,
                 resume: bool):
        self.rest = rest
        self.client = client
        self.progress = progress
        self.budget = budget
        self.resume = resume
        self.received = 0
        self.resumed = 0
        self.done = 0  # for progress: bytes on disk across all files of this download
        self.total: int | None = None

    def fetch(self, url: str, part: Path) -> _Fetched:
        """Blocking: run it in a worker thread."""
        meta_path = part.with_name(part.name + ".json")
        meta = _read_json(meta_path) if self.resume else None
        offset = part.stat().st_size if (meta and part.is_file() and meta.get("etag")) else 0
        if offset == 0:
            part.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
        holder = self.rest.holder
        headers = dict(holder.transport.headers()) if url.startswith(holder.base_url) else {}
        headers["accept-encoding"] = "identity"  # ranges count bytes of the file itself
        if offset:
            headers["range"] = f"bytes={offset}-"
            headers["if-range"] = meta["etag"]  # type: ignore[index]
        for _ in range(2):
            with self.client.stream("GET", url, headers=headers) as response:
                if response.status_code == 416 and offset:
                    size = _total_from_content_range(response.headers.get("content-range"))
                    if size == offset:  # everything was already here
                        return _Fetched(0, offset, offset, meta.get("sha256") if meta else None)
                    part.unlink(missing_ok=True)  # the part is longer than the file: start again
                    offset = 0
                    headers.pop("range", None)
                    headers.pop("if-range", None)
                    continue
                if response.status_code not in (200, 206):
                    raise DownloadError(f"download of {_shown(url)} failed with HTTP {response.status_code}")
                digest = response.headers.get("x-tinkex-sha256")
                etag = response.headers.get("etag")
                if response.status_code == 206:
                    start = _start_from_content_range(response.headers.get("content-range"))
                    if start != offset:
                        raise DownloadError(f"asked for bytes from {offset}, the server sent from {start}")
                    size = _total_from_content_range(response.headers.get("content-range"))
                    mode = "ab"
                else:
                    length = response.headers.get("content-length")
                    size = int(length) if length is not None else None
                    offset, mode = 0, "wb"
                if etag:
                    _write_json(meta_path, {"etag": etag, "sha256": digest, "size": size, "url_path": _shown(url)})
                else:
                    meta_path.unlink(missing_ok=True)  # without an ETag a resume could mix two versions
                self.resumed += offset
                self.done += offset
                if self.total is None and size is not None:
                    self.total = size
                self._report()
                written = 0
                with open(part, mode) as out:
                    for block in response.iter_raw(self.budget):
                        out.write(block)
                        written += len(block)
                        self.received += len(block)
                        self.done += len(block)
                        self._report()
                if size is not None and offset + written != size:
                    raise DownloadError(f"the download of {_shown(url)} ended after {offset + written} of {size} bytes")
                return _Fetched(written, offset, offset + written, digest)
        raise DownloadError(f"could not resume the download of {_shown(url)}")

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total)


async def _download_archive(rest: RestClient, fetcher: _Fetcher, tinker_path: str, target: Path,
                            verify: bool) -> None:
    archive = await rest.get_checkpoint_archive_url_from_tinker_path(tinker_path)
    url = urljoin(rest.holder.base_url + "/", archive.url)
    part = target.with_name(target.name + ".tar.gz.part")
    part.parent.mkdir(parents=True, exist_ok=True)
    fetched = await asyncio.to_thread(fetcher.fetch, url, part)
    if verify and fetched.sha256:
        await _check_sha256(part, fetched.sha256, fetcher.budget, what=f"the archive of {tinker_path}")
    staging = target.with_name(f".{target.name}.extract-{uuid.uuid4().hex[:8]}")
    try:
        await asyncio.to_thread(_extract, part, staging)
        if verify:
            await asyncio.to_thread(_check_state_file, staging, fetcher.budget)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    part.unlink(missing_ok=True)
    part.with_name(part.name + ".json").unlink(missing_ok=True)


async def _download_files(rest: RestClient, fetcher: _Fetcher, tinker_path: str, target: Path,
                          verify: bool) -> None:
    urls = await rest.get_external_weights_urls(tinker_path)
    staging = target.with_name(target.name + ".part")
    for relpath, url in sorted(urls.urls.items()):
        dest = (staging / relpath).resolve()
        if staging.resolve() not in dest.parents:
            raise DownloadError(f"refusing a file outside the download directory: {relpath!r}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        if dest.is_file() and fetcher.resume:  # finished in an earlier, interrupted call
            fetcher.done += dest.stat().st_size
            fetcher.resumed += dest.stat().st_size
            continue
        fetched = await asyncio.to_thread(fetcher.fetch, url, part)
        if verify and fetched.sha256:
            await _check_sha256(part, fetched.sha256, fetcher.budget, what=relpath)
        os.replace(part, dest)
        part.with_name(part.name + ".json").unlink(missing_ok=True)
    if verify:
        await asyncio.to_thread(_check_state_file, staging, fetcher.budget)
    os.replace(staging, target)


# ---- verification and extraction ----------------------------------------------------------------


def sha256_file(path: Path, block: int = DEFAULT_MEMORY_BUDGET) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


async def _check_sha256(path: Path, expected: str, block: int, what: str) -> None:
    actual = await asyncio.to_thread(sha256_file, path, block)
    if actual != expected.strip('"'):
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".json").unlink(missing_ok=True)
        raise ChecksumMismatch(f"{what}: SHA-256 {actual} does not match the server's {expected}; the partial "
                               "download was removed, so the next try starts afresh")


def _check_state_file(directory: Path, block: int) -> int:
    """Check every file that tinkex_state.json lists; return how many were checked."""
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        return 0
    try:
        listed = json.loads(state_path.read_text()).get("files", {})
    except ValueError as exc:
        raise ChecksumMismatch(f"{STATE_FILE} is not valid JSON: {exc}") from None
    for name, expected in listed.items():
        path = directory / name
        if not path.is_file():
            raise ChecksumMismatch(f"{name} is listed in {STATE_FILE} but missing from the download")
        if path.stat().st_size != expected.get("bytes"):
            raise ChecksumMismatch(f"{name} has {path.stat().st_size} bytes, {STATE_FILE} says {expected.get('bytes')}")
        if sha256_file(path, block) != expected.get("sha256"):
            raise ChecksumMismatch(f"{name} does not match the SHA-256 in {STATE_FILE}")
    return len(listed)


def _extract(archive: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, mode="r:*") as tar:
        tar.extractall(target, filter="data")


# ---- small helpers ------------------------------------------------------------------------------

_ssl: Any = None


def _ssl_context() -> Any:
    """One TLS context for every download (building one loads the CA bundle each time)."""
    global _ssl
    if _ssl is None:
        import ssl

        import certifi

        _ssl = ssl.create_default_context(cafile=certifi.where())
    return _ssl



def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _start_from_content_range(value: str | None) -> int | None:
    try:
        return int(value.split()[1].split("-")[0]) if value else None  # type: ignore[union-attr]
    except (IndexError, ValueError):
        return None


def _total_from_content_range(value: str | None) -> int | None:
    try:
        total = value.rsplit("/", 1)[1] if value else "*"  # type: ignore[union-attr]
        return None if total == "*" else int(total)
    except (IndexError, ValueError):
        return None


def _shown(url: str) -> str:
    """A URL without its signature, for messages."""
    return url.split("/downloads/", 1)[0] + "/downloads/..." if "/downloads/" in url else url

