"""Taking weights away: external (Hugging Face PEFT) exports, checkpoint archives and signed downloads.

Download links are signed with a secret of the data directory and expire, like the hosted service's,
so they can be handed to tools that send no API key (curl, a browser, `huggingface-cli`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import secrets
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

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
def download(token: str, runtime: RuntimeDep):
    claims = _verify(runtime, token)
    checkpoint = runtime.store.get(CheckpointRow, claims["path"])
    if checkpoint is None:
        raise not_found("checkpoint")
    root = Path(checkpoint.directory).resolve()
    if claims["file"] is not None:
        target = (root / claims["file"]).resolve()
        if root not in target.parents or not target.is_file():
            raise not_found(f"file {claims['file']!r}")
        return FileResponse(target, filename=target.name)
    name = tinker_path(checkpoint.training_run_id, checkpoint.checkpoint_type, checkpoint.name)[len("tinker://"):]
    return StreamingResponse(_tar_chunks(root), media_type="application/gzip", headers={
        "Content-Disposition": f'attachment; filename="{name.replace("/", "_").replace(":", "_")}.tar.gz"'})


class _Pipe(io.RawIOBase):
    """A write-only file that hands what is written to a generator, so the archive streams."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.chunks.append(bytes(data))
        return len(data)


def _tar_chunks(root: Path):
    pipe = _Pipe()
    with tarfile.open(fileobj=pipe, mode="w|gz") as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.add(path, arcname=path.relative_to(root).as_posix())
                yield from pipe.chunks
                pipe.chunks.clear()
    yield from pipe.chunks
