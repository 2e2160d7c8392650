"""Taking weights away: external (Hugging Face PEFT) exports, checkpoint archives and signed downloads.

Download links are signed with a secret of the data directory and expire, like the hosted service's,
so they can be handed to tools that send no API key (curl, a browser, `huggingface-cli`).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import tarfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from tinkex.types import CheckpointArchiveUrlResponse, tinker_path
from tinkex.types._api import ExternalWeightsUrlsResponse, SaveWeightsExternalRequest, SaveWeightsExternalResponse

from ..deps import RuntimeDep, TenantDep
from ..futures import Outcome
from ..runtime import Runtime, bad_request, not_found
from ..store import CheckpointRow
from .training import _record_checkpoint, enqueue

router = APIRouter(prefix="/api/v1")
LINK_SECONDS = 3600


def _secret(runtime: Runtime) -> bytes:
    path = runtime.settings.data_dir / "download_secret"
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
        except FileExistsError:
            pass
    return path.read_text().strip().encode()


def _sign(runtime: Runtime, claims: dict) -> str:
    payload = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).decode().rstrip("=")
    mac = hmac.new(_secret(runtime), payload.encode(), hashlib.sha256).hexdigest()
    return f"{payload}.{mac}"


def _verify(runtime: Runtime, token: str) -> dict:
    payload, _, mac = token.rpartition(".")
    expected = hmac.new(_secret(runtime), payload.encode(), hashlib.sha256).hexdigest()
    if not payload or not hmac.compare_digest(mac, expected):
        raise HTTPException(status_code=403, detail="invalid download link")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    if claims["exp"] < time.time():
        raise HTTPException(status_code=403, detail="this download link has expired; ask for a new one")
    return claims


def _link(runtime: Runtime, request: Request, checkpoint: CheckpointRow, file: str | None) -> str:
    token = _sign(runtime, {"path": checkpoint.tinker_path, "file": file, "exp": int(time.time()) + LINK_SECONDS})
    return str(request.url_for("download", token=token))


@router.post("/save_weights_external")
def save_weights_external(body: SaveWeightsExternalRequest, runtime: RuntimeDep, tenant: TenantDep):
    def build():
        runtime.live_model(body.model_id, tenant)
        if body.age_encryption_recipients:
            raise bad_request("this server does not encrypt exports; omit age_encryption_recipients")
        name = runtime.checkpoint_name(body.path)
        directory = runtime.checkpoint_dir(tenant, body.model_id, "external", name)

        def run() -> Outcome:
            size = runtime.engine.save_sampler_weights(body.model_id, directory)  # PEFT adapter files
            path = _record_checkpoint(runtime, tenant, body.model_id, "external", name, directory, size,
                                      body.ttl_seconds, None)
            return Outcome(result=SaveWeightsExternalResponse(path=path, size_bytes=size))

        return run

    return enqueue(runtime, tenant, body.model_id, body.seq_id, "SaveWeightsExternal", build)


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls")
def external_weights_urls(run_id: str, checkpoint_id: str, request: Request, runtime: RuntimeDep,
                          tenant: TenantDep) -> ExternalWeightsUrlsResponse:
    checkpoint = runtime.owned_checkpoint(run_id, checkpoint_id, tenant)
    if checkpoint.checkpoint_type != "external":
        raise bad_request("external_weights_urls is for tinker://<run>/external_weights/<name> checkpoints")
    root = Path(checkpoint.directory)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return ExternalWeightsUrlsResponse(urls={f: _link(runtime, request, checkpoint, f) for f in files},
                                       expires=datetime.fromtimestamp(time.time() + LINK_SECONDS, UTC))


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/archive")
def checkpoint_archive(run_id: str, checkpoint_id: str, request: Request, runtime: RuntimeDep, tenant: TenantDep,
                       redirect: bool = True):
    """A signed link to a .tar.gz of the checkpoint: a 302 (as SDK 0.23 expects) or JSON with redirect=false."""
    checkpoint = runtime.owned_checkpoint(run_id, checkpoint_id, tenant)
    url = _link(runtime, request, checkpoint, None)
    expires = datetime.fromtimestamp(time.time() + LINK_SECONDS, UTC)
    if redirect:
        return RedirectResponse(url, status_code=302, headers={"Expires": expires.strftime("%a, %d %b %Y %H:%M:%S GMT")})
    return CheckpointArchiveUrlResponse(url=url, expires=expires)


@router.get("/downloads/{token}", name="download")
def download(token: str, request: Request, runtime: RuntimeDep):
    """A signed download: one file of a checkpoint, or the whole checkpoint as a .tar.gz.

    Both answer with Content-Length, an ETag and `X-Tinkex-Sha256` (the SHA-256 of the whole body),
    and honour `Range: bytes=N-` (with `If-Range: <etag>`), so an interrupted download resumes.
    Archives are built once per checkpoint content, byte for byte reproducibly, and cached under
    the data directory's `archives/`.
    """
    claims = _verify(runtime, token)
    checkpoint = runtime.store.get(CheckpointRow, claims["path"])
    if checkpoint is None:
        raise not_found("checkpoint")
    root = Path(checkpoint.directory).resolve()
    if claims["file"] is not None:
        target = (root / claims["file"]).resolve()
        if root not in target.parents or not target.is_file():
            raise not_found(f"file {claims['file']!r}")
        digest = _file_sha256(root, target)
        return _ranged(request, target, digest, "application/octet-stream", target.name)
    if not root.is_dir():
        raise not_found(f"the files of {checkpoint.tinker_path}")
    name = tinker_path(checkpoint.training_run_id, checkpoint.checkpoint_type, checkpoint.name)[len("tinker://"):]
    archive, digest = _archive(runtime, checkpoint.tinker_path, root)
    return _ranged(request, archive, digest, "application/gzip",
                   f'{name.replace("/", "_").replace(":", "_")}.tar.gz')


# ---- serving files with Range -------------------------------------------------------------------

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_BLOCK = 1 << 20


def _ranged(request: Request, path: Path, digest: str, media_type: str, filename: str) -> Response:
    size = path.stat().st_size
    etag = f'"{digest}"'
    headers = {"Accept-Ranges": "bytes", "ETag": etag, "X-Tinkex-Sha256": digest,
               "Content-Disposition": f'attachment; filename="{filename}"'}
    wanted = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if wanted and (if_range is None or if_range.strip() == etag):
        match = _RANGE.fullmatch(wanted.strip())
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else size - 1
            else:  # a suffix: the last N bytes
                start, end = max(0, size - int(match.group(2))), size - 1
            if start >= size or end < start:
                return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
            end = min(end, size - 1)
            headers.update({"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(end - start + 1)})
            return StreamingResponse(_chunks(path, start, end + 1), status_code=206, headers=headers,
                                     media_type=media_type)
    headers["Content-Length"] = str(size)
    return StreamingResponse(_chunks(path, 0, size), headers=headers, media_type=media_type)


def _chunks(path: Path, start: int, stop: int):
    with open(path, "rb") as handle:
        handle.seek(start)
        left = stop - start
        while left > 0:
            block = handle.read(min(_BLOCK, left))
            if not block:
                return
            left -= len(block)
            yield block


_hash_cache: dict[tuple[str, int, int], str] = {}


def _file_sha256(root: Path, target: Path) -> str:
    """From the checkpoint's tinkex_state.json when it lists the file, else computed (and cached)."""
    stat = target.stat()
    state = root / "tinkex_state.json"
    relative = target.relative_to(root).as_posix()
    if state.is_file() and target != state:
        try:
            entry = json.loads(state.read_text()).get("files", {}).get(relative)
            if entry and entry.get("bytes") == stat.st_size:
                return entry["sha256"]
        except (OSError, ValueError, AttributeError):
            pass
    key = (str(target), stat.st_size, stat.st_mtime_ns)
    if key not in _hash_cache:
        digest = hashlib.sha256()
        with open(target, "rb") as handle:
            for block in iter(lambda: handle.read(_BLOCK), b""):
                digest.update(block)
        if len(_hash_cache) > 4096:
            _hash_cache.clear()
        _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


# ---- reproducible, cached archives --------------------------------------------------------------

_archive_locks: dict[str, threading.Lock] = {}
_archive_locks_guard = threading.Lock()
ARCHIVE_KEEP_SECONDS = 24 * 3600


class _HashingWriter(io.RawIOBase):
    def __init__(self, raw) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        return self.raw.write(data)


def _archive(runtime: Runtime, tinker_path_: str, root: Path) -> tuple[Path, str]:
    """The checkpoint as a .tar.gz (deterministic: sorted names, fixed owners and times, gzip mtime 0)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    listing = [(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    path_key = hashlib.sha256(tinker_path_.encode()).hexdigest()[:16]
    content_key = hashlib.sha256(json.dumps([tinker_path_, listing]).encode()).hexdigest()[:24]
    cache = runtime.settings.data_dir / "archives"
    archive = cache / f"{path_key}-{content_key}.tar.gz"
    digest_file = cache / f"{path_key}-{content_key}.sha256"
    if archive.is_file() and digest_file.is_file():
        _touch(archive, digest_file)
        return archive, digest_file.read_text().strip()
    with _archive_locks_guard:
        lock = _archive_locks.setdefault(path_key, threading.Lock())
    with lock:
        if archive.is_file() and digest_file.is_file():
            return archive, digest_file.read_text().strip()
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{archive.name}.{secrets.token_hex(6)}.tmp"
        try:
            with open(tmp, "wb") as raw:
                hashing = _HashingWriter(raw)
                with gzip.GzipFile(fileobj=hashing, mode="wb", mtime=0, compresslevel=6) as gz:
                    with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                        for path, (relative, size, mtime_ns) in zip(files, listing):
                            info = tarfile.TarInfo(relative)
                            info.size, info.mtime, info.mode = size, mtime_ns // 1_000_000_000, 0o644
                            info.uid = info.gid = 0
                            info.uname = info.gname = ""
                            with open(path, "rb") as handle:
                                tar.addfile(info, handle)
            digest = hashing.digest.hexdigest()
            os.replace(tmp, archive)
            digest_file.write_text(digest + "\n")
        finally:
            tmp.unlink(missing_ok=True)
        _sweep(cache, path_key, archive)
        return archive, digest


def _touch(*paths: Path) -> None:
    for path in paths:
        try:
            os.utime(path)
        except OSError:
            pass


def _sweep(cache: Path, path_key: str, keep: Path) -> None:
    """Drop older archives of the same checkpoint, and any archive not served for a day."""
    now = time.time()
    keep_base = keep.name.split(".")[0]
    for item in cache.iterdir():
        base = item.name.split(".")[0]
        if item.name.startswith(".") or base == keep_base:
            continue
        try:
            if base.startswith(f"{path_key}-") or now - item.stat().st_mtime > ARCHIVE_KEEP_SECONDS:
                item.unlink(missing_ok=True)
        except OSError:
            pass
