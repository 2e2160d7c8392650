"""Real HTTP helpers for client tests: a scripted fake server and a recording proxy.

Both listen on loopback in a background thread (ThreadingHTTPServer, HTTP/1.1 keep-alive).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0
    response_body: bytes = b""
    started: float = 0.0
    finished: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def response_json(self) -> Any:
        return json.loads(self.response_body) if self.response_body else None


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict/list -> JSON, bytes -> raw
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class _Base(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), self._handler_class())
        self.records: list[Recorded] = []
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> _Base:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def handle(self, record: Recorded) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError

    def requests_to(self, path: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.records if r.path.split("?")[0] == path]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _do(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                record = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                                  started=time.monotonic())
                with outer.lock:
                    outer.records.append(record)
                status, headers, payload = outer.handle(record)
                record.status, record.response_body, record.finished = status, payload, time.monotonic()
                self.send_response(status)
                for key, value in headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(key, value)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _do

        return Handler


class ScriptedServer(_Base):
    """Answers each path from a queue of scripted replies; once a queue is empty, from its default."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: dict[str, list[Reply]] = {}
        self.defaults: dict[str, Reply | Callable[[Recorded], Reply]] = {
            "/api/v1/client/config": Reply(body={}),
            "/api/v1/client/dynamic_config": Reply(404, {"detail": "not found"}),
            "/api/v1/create_session": Reply(body={"session_id": "sess-1"}),
            "/api/v1/session_heartbeat": Reply(body={"type": "session_heartbeat"}),
            "/api/v1/telemetry": Reply(body={"status": "accepted"}),
        }

    def script(self, path: str, *replies: Reply) -> None:
        with self.lock:
            self.scripts.setdefault(path, []).extend(replies)

    def handle(self, record: Recorded) -> tuple[int, dict[str, str], bytes]:
        path = record.path.split("?")[0]
        with self.lock:
            queue = self.scripts.get(path)
            reply = queue.pop(0) if queue else self.defaults.get(path, Reply(404, {"detail": f"no route {path}"}))
        if callable(reply):
            reply = reply(record)
        if reply.delay:
            time.sleep(reply.delay)
        body = reply.body
        headers = dict(reply.headers)
        if isinstance(body, bytes):
            payload = body
        elif body is None:
            payload = b""
        else:
            payload = json.dumps(body).encode()
            headers.setdefault("content-type", "application/json")
        return reply.status, headers, payload


class RecordingProxy(_Base):
    """Forwards every request to `upstream` and records it; can lose responses on purpose.

    `lose_response(path, n)`: the next n requests to `path` reach the server, but the client gets a
    503 instead of the server's answer (as when a connection drops after the server accepted).
    """

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = upstream.rstrip("/")
        self._local = threading.local()
        self.lost: dict[str, int] = {}
        self.upstream_responses: list[Recorded] = []

    def lose_response(self, path: str, count: int = 1) -> None:
        with self.lock:
            self.lost[path] = count

    def _client(self) -> httpx.Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(timeout=120)
        return client

    def handle(self, record: Recorded) -> tuple[int, dict[str, str], bytes]:
        headers = {k: v for k, v in record.headers.items() if k not in ("host", "content-length", "connection")}
        response = self._client().request(record.method, self.upstream + record.path, content=record.body,
                                          headers=headers)
        path = record.path.split("?")[0]
        with self.lock:
            upstream = Recorded(record.method, record.path, record.headers, record.body, response.status_code,
                                response.content)
            self.upstream_responses.append(upstream)
            if self.lost.get(path, 0) > 0:
                self.lost[path] -= 1
                return 503, {"content-type": "application/json"}, b'{"detail": "response lost by the test proxy"}'
        return response.status_code, dict(response.headers), response.content
