"""Multipart uploads in the transport (`files=`): encoding, streaming from disk, retries resend the file.

No Tinker endpoint takes files yet, so these run against a scripted HTTP server that records bodies.
"""

from __future__ import annotations

import email.parser
import email.policy
import httpx
import pytest

from tinkex.client._loop import run_sync
from tinkex.client._transport import Transport, multipart_files

from ._http import Reply


def _parts(record) -> dict[str, tuple[str | None, str, bytes]]:
    """name -> (filename, content type, payload), parsed with the standard library's MIME parser."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"content-type: " + record.headers["content-type"].encode() + b"\r\n\r\n" + record.body)
    assert message.is_multipart()
    out = {}
    for part in message.iter_parts():
        out[part.get_param("name", header="content-disposition")] = (
            part.get_filename(), part.get_content_type(), part.get_payload(decode=True))
    return out


def test_files_and_fields_are_sent_as_multipart(scripted, tmp_path):
    scripted.script("/api/v1/upload", Reply(body={"ok": True}))
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(bytes(range(256)) * 64)
    transport = Transport(scripted.base_url, "tml-test-key")
    with open(tmp_path / "opened.bin", "wb") as handle:
        handle.write(b"from an open file")
    with open(tmp_path / "opened.bin", "rb") as opened:
        run_sync(transport.request("POST", "/api/v1/upload", files={
            "weights": weights,  # a path: streamed, named after the file
            "config": ("adapter_config.json", b'{"r": 8}', "application/json"),
            "raw": b"\x00\x01",
            "handle": opened,
        }, data={"name": "imported", "base_model": "tinkex/tiny-qwen3"}), timeout=30)
    record = scripted.requests_to("/api/v1/upload")[0]
    assert record.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert "x-idempotency-key" in record.headers and record.headers["x-api-key"] == "tml-test-key"
    parts = _parts(record)
    assert parts["weights"] == ("adapter_model.safetensors", "application/octet-stream", weights.read_bytes())
    assert parts["config"] == ("adapter_config.json", "application/json", b'{"r": 8}')
    assert parts["raw"][2] == b"\x00\x01" and parts["handle"][:1] == ("opened.bin",)
    assert parts["handle"][2] == b"from an open file"
    assert parts["name"][2] == b"imported" and parts["base_model"][2] == b"tinkex/tiny-qwen3"
    run_sync(transport.aclose())


def test_a_retried_upload_sends_the_whole_file_again(scripted, tmp_path):
    scripted.script("/api/v1/upload", Reply(503, {"detail": "busy"}, headers={"retry-after-ms": "10"}),
                    Reply(body={"ok": True}))
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (3 * 1024 * 1024))
    transport = Transport(scripted.base_url, "tml-test-key")
    run_sync(transport.request("POST", "/api/v1/upload", files={"file": big}), timeout=60)
    first, second = scripted.requests_to("/api/v1/upload")
    assert _parts(first)["file"][2] == _parts(second)["file"][2] == big.read_bytes()
    assert first.headers["x-idempotency-key"] == second.headers["x-idempotency-key"]
    assert second.headers["x-stainless-retry-count"] == "1"
    # the body streams from disk in chunks, never the whole file in memory
    opened: list = []
    request = httpx.Client().build_request("POST", "http://x/", files=multipart_files({"file": big}, opened))
    sizes = [len(chunk) for chunk in request.stream]
    assert sum(sizes) > big.stat().st_size and max(sizes) <= 64 * 1024
    assert int(request.headers["content-length"]) == sum(sizes)
    for handle in opened:
        handle.close()
    with pytest.raises(ValueError, match="multipart"):
        run_sync(transport.request("POST", "/api/v1/upload", files={"f": b"x"}, json={"a": 1}), timeout=10)
    run_sync(transport.aclose())
