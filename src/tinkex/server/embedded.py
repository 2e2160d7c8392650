"""The server in a background thread of the current process: the SDK's zero-configuration default."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from pathlib import Path

import uvicorn

from .app import create_app
from .runtime import ServerSettings


def default_data_dir() -> Path:
    if home := os.environ.get("TINKEX_HOME"):
        return Path(home)
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "tinkex"


def local_api_key(data_dir: Path) -> str:
    """The data directory's own key, made on first use and kept private to the user."""
    path = data_dir / "api_key"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = f"tml-local-{secrets.token_hex(16)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedServer:
    def __init__(self, data_dir: Path | None = None, host: str = "127.0.0.1", port: int = 0,
                 api_keys: dict[str, str] | None = None, base_models: list[str] | None = None,
                 fault_injection: bool = False, **settings):
        data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        if not api_keys:
            api_keys = {local_api_key(data_dir): "local"}
        self.api_key = next(iter(api_keys))
        self.settings = ServerSettings(data_dir=data_dir, host=host, port=port or free_port(host), api_keys=api_keys,
                                       fault_injection=fault_injection, **settings)
        if base_models:
            self.settings.base_models = list(base_models)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.runtime = None  # the running server's Runtime (store, scheduler, engine), once started

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    def start(self, timeout: float = 120.0) -> EmbeddedServer:
        app = create_app(self.settings)
        self.runtime = app.state.runtime
        config = uvicorn.Config(app, host=self.settings.host, port=self.settings.port, log_level="warning",
                                access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="tinkex-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the embedded tinkex server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
            self._server = None

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()
