"""Where the SDK connects and with which credential.

Precedence for the base URL: the `base_url` argument, then `TINKER_BASE_URL` (empty counts as
unset). For the credential: the `api_key` argument, then `TINKER_API_KEY`, then the output of
`TINKER_CREDENTIAL_CMD`, then the default key stored in `~/.tinker/credentials.json`.

- a base URL and a credential: use them;
- a credential but no base URL: the hosted Tinker service;
- neither: the embedded tinkex server, started once per process on loopback.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..types._exceptions import TinkerError
from ._constants import DEFAULT_BASE_URL

MISSING_API_KEY_MESSAGE = (
    "No API key: pass api_key=..., set TINKER_API_KEY, or leave both the base URL and the key unset "
    "to use the embedded tinkex server."
)


@dataclass(frozen=True)
class Connection:
    base_url: str
    api_key: str
    embedded: bool = False


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def check_api_key(api_key: str) -> str:
    """Keys are `tml-...` or a JWT (`eyJ...`); anything else is refused before a request is sent."""
    if not (api_key.startswith("tml-") or api_key.startswith("eyJ")):
        raise TinkerError("The api_key must start with the 'tml-' prefix")
    return api_key


def _credential_from_command() -> str | None:
    command = _env("TINKER_CREDENTIAL_CMD")
    if not command:
        return None
    try:
        output = subprocess.run(command, shell=True, check=True, capture_output=True, text=True, timeout=60)
    except (subprocess.SubprocessError, OSError) as exc:
        raise TinkerError(f"TINKER_CREDENTIAL_CMD failed: {exc}") from exc
    token = output.stdout.strip()
    return token or None


def _stored_credential() -> str | None:
    path = Path.home() / ".tinker" / "credentials.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    default = data.get("default")
    entry = (data.get("keys") or {}).get(default) if default else None
    key = entry.get("key") if isinstance(entry, dict) else None
    return key if isinstance(key, str) and key else None


def find_credential(api_key: str | None = None) -> str | None:
    """The credential that would be used, or None; no network access."""
    if api_key:
        return api_key
    return _env("TINKER_API_KEY") or _credential_from_command() or _stored_credential()


def resolve(base_url: str | None = None, api_key: str | None = None) -> Connection:
    url = base_url or _env("TINKER_BASE_URL")
    key = find_credential(api_key)
    if url is None and key is None:
        server = embedded_server()
        return Connection(base_url=server.base_url.rstrip("/"), api_key=server.api_key, embedded=True)
    if url is None:
        url = DEFAULT_BASE_URL
    url = url.rstrip("/")
    if key is None:
        raise TinkerError(MISSING_API_KEY_MESSAGE)
    return Connection(base_url=url, api_key=check_api_key(key))


# ---- the embedded server ------------------------------------------------------------------------

_embedded_lock = threading.Lock()
_embedded: Any = None
_embedded_pid: int | None = None


def embedded_server() -> Any:
    """The process's embedded tinkex server, started on first use (loopback, per-user data dir)."""
    global _embedded, _embedded_pid
    with _embedded_lock:
        if _embedded is None or _embedded_pid != os.getpid():
            try:
                from tinkex.server import EmbeddedServer  # heavy: torch, FastAPI; only imported here
            except ImportError as exc:
                raise TinkerError(
                    "No base URL or API key is configured, and the embedded server is not installed. "
                    "Install it with `pip install 'tinkex[server]'`, or set TINKER_BASE_URL and TINKER_API_KEY."
                ) from exc
            server = EmbeddedServer()
            server.start()
            atexit.register(_stop_embedded, server)
            _embedded, _embedded_pid = server, os.getpid()
        return _embedded


def _stop_embedded(server: Any) -> None:
    try:
        server.stop()
    except Exception:
        pass


def embedded_key_for(base_url: str) -> str | None:
    """The embedded server's key, when `base_url` is the embedded server of this process."""
    server = _embedded
    if server is not None and _embedded_pid == os.getpid() and server.base_url.rstrip("/") == base_url.rstrip("/"):
        return server.api_key
    return None
