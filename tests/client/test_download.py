"""Checkpoint downloads against a real server: bounded memory, verification, resuming, HTTP ranges."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import httpx
import pytest

import tinkex
from tinkex import types
from tinkex.client import telemetry
from tinkex.client.download import ChecksumMismatch, sha256_file

from ..conftest import ALICE
from .conftest import MODEL, sft_datum

BUDGET = 16 * 1024


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def big_checkpoint(service_client):
    """A trained rank-256 state: weights and Adam moments, about 13 MB, far above BUDGET."""
    trainer = service_client.create_lora_training_client(MODEL, rank=256, seed=7).result(60)
    trainer.forward_backward([sft_datum(list(range(5, 60)))], "cross_entropy").result(60)
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result(60)
    return trainer, trainer.save_state("big").result(60).path


@pytest.fixture
def rest(server):
    return tinkex.RestClient(base_url=server.base_url, api_key=ALICE)


def _server_dir(server, path: str) -> Path:
    """Where the server keeps a training checkpoint's files."""
    run, _, name = path[len("tinker://"):].partition("/weights/")
    return next((server.data_dir / "checkpoints").rglob(f"{run.replace(':', '_')}/weights/{name}"))


def test_a_checkpoint_larger_than_the_memory_budget_downloads_in_bounded_memory(rest, big_checkpoint, tmp_path,
                                                                                  server):
    _, path = big_checkpoint
    source = _server_dir(server, path)
    on_server = sum(p.stat().st_size for p in source.iterdir())
    assert on_server > 500 * BUDGET
    progress: list[tuple[int, int | None]] = []
    tracemalloc.start()
    try:
        target = rest.download_checkpoint(path, tmp_path, memory_budget=BUDGET,
                                          progress=lambda done, total: progress.append((done, total))).result(120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # blocks of BUDGET bytes, plus the fixed buffers of the HTTP client (64 KiB reads) and of gzip;
    # nothing that grows with the checkpoint
    assert peak < on_server / 5, f"peak {peak} bytes for a {on_server}-byte checkpoint"
    assert {p.name: sha256_file(p) for p in target.iterdir()} == {p.name: sha256_file(p) for p in source.iterdir()}
    done = [d for d, _ in progress]
    assert done == sorted(done) and progress[-1][0] == progress[-1][1]
    assert len(progress) > 10  # many small blocks, not one big read
    assert not list(tmp_path.glob("*.part*"))  # nothing left behind


def test_an_interrupted_download_resumes_where_it_stopped(rest, big_checkpoint, tmp_path):
    _, path = big_checkpoint

    def stop_after_a_third(done: int, total: int | None) -> None:
        if total and done > total // 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        rest.download_checkpoint(path, tmp_path, memory_budget=BUDGET, progress=stop_after_a_third).result(120)
    part = next(tmp_path.glob("*.tar.gz.part"))
    kept = part.stat().st_size
    assert kept > 0 and part.with_name(part.name + ".json").is_file()

    seen: list[int] = []
    with telemetry.capture(telemetry.DOWNLOAD) as events:
        target = rest.download_checkpoint(path, tmp_path, memory_budget=BUDGET,
                                          progress=lambda done, _total: seen.append(done)).result(120)
    assert seen[0] >= kept  # it started from the bytes it had
    assert events[-1].attributes["resumed_from"] == kept
    assert events[-1].attributes["bytes"] < events[-1].attributes["resumed_from"] * 3
    assert (target / "tinkex_state.json").is_file() and not part.exists()


def test_a_corrupted_partial_download_is_caught_and_the_next_try_starts_afresh(rest, big_checkpoint, tmp_path):
    _, path = big_checkpoint

    def interrupt(done: int, total: int | None) -> None:
        if total and done > total // 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        rest.download_checkpoint(path, tmp_path, memory_budget=BUDGET, progress=interrupt).result(120)
    part = next(tmp_path.glob("*.tar.gz.part"))
    data = bytearray(part.read_bytes())
    data[1000:1010] = bytes(10)  # damage what was already on disk
    part.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match="SHA-256"):
        rest.download_checkpoint(path, tmp_path, memory_budget=BUDGET).result(120)
    assert not part.exists()
    target = rest.download_checkpoint(path, tmp_path, memory_budget=BUDGET).result(120)
    assert (target / "optimizer.safetensors").is_file()


def test_files_are_checked_against_the_checkpoints_own_hashes(rest, service_client, server, tmp_path):
    trainer = service_client.create_lora_training_client(MODEL, rank=4, seed=8).result(60)
    path = trainer.save_state("to-tamper").result(60).path
    weights = _server_dir(server, path) / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-8] + bytes(b ^ 0xFF for b in original[-8:]))  # corrupted on the server's disk
    with pytest.raises(ChecksumMismatch, match="adapter_model.safetensors"):
        rest.download_checkpoint(path, tmp_path).result(120)
    assert not list(tmp_path.iterdir()) or all(p.name.endswith(".part") or p.name.endswith(".json")
                                               for p in tmp_path.iterdir())
    target = rest.download_checkpoint(path, tmp_path, verify=False).result(120)  # on request, as it is
    assert (target / "adapter_model.safetensors").read_bytes() == weights.read_bytes() != original


def test_external_exports_download_file_by_file_and_resume(rest, big_checkpoint, tmp_path):
    trainer, _ = big_checkpoint
    exported = trainer.save_weights_external("export").result(60).path
    calls = [0]

    def interrupt(done: int, total: int | None) -> None:
        calls[0] += 1
        if calls[0] == 20:
            raise Interrupt

    with pytest.raises(Interrupt):
        rest.download_checkpoint(exported, tmp_path, memory_budget=BUDGET, progress=interrupt).result(120)
    assert list(tmp_path.glob("*.part"))
    with telemetry.capture(telemetry.DOWNLOAD) as events:
        target = rest.download_checkpoint(exported, tmp_path, memory_budget=BUDGET).result(120)
    assert events[-1].attributes["resumed_from"] > 0
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in target.iterdir()}
    assert not list(tmp_path.glob("*.part"))


def test_the_download_route_serves_ranges_with_an_etag(rest, big_checkpoint):
    _, path = big_checkpoint
    url = rest.get_checkpoint_archive_url_from_tinker_path(path).result(30).url
    with httpx.Client(timeout=60) as http:
        whole = http.get(url)
        assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
        digest = whole.headers["x-tinkex-sha256"]
        assert hashlib.sha256(whole.content).hexdigest() == digest and whole.headers["etag"] == f'"{digest}"'
        assert int(whole.headers["content-length"]) == len(whole.content)
        again = http.get(url)
        assert again.content == whole.content  # built once, byte for byte the same
        part = http.get(url, headers={"range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == whole.content[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{len(whole.content)}"
        tail = http.get(url, headers={"range": "bytes=-50"})
        assert tail.status_code == 206 and tail.content == whole.content[-50:]
        rest_of_it = http.get(url, headers={"range": "bytes=1000-", "if-range": whole.headers["etag"]})
        assert rest_of_it.status_code == 206 and rest_of_it.content == whole.content[1000:]
        stale = http.get(url, headers={"range": "bytes=1000-", "if-range": '"something-else"'})
        assert stale.status_code == 200 and stale.content == whole.content
        beyond = http.get(url, headers={"range": f"bytes={len(whole.content)}-"})
        assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(whole.content)}"


def test_existing_targets_need_force(rest, big_checkpoint, tmp_path):
    _, path = big_checkpoint
    target = rest.download_checkpoint(path, tmp_path).result(120)
    with pytest.raises(FileExistsError):
        rest.download_checkpoint(path, tmp_path)
    (target / "extra").write_text("x")
    again = rest.download_checkpoint(path, tmp_path, force=True).result(120)
    assert again == target and not (target / "extra").exists()
    with pytest.raises(ValueError):
        rest.download_checkpoint(path, tmp_path / "other", memory_budget=100).result(10)
