"""Shared fixtures: an offline Hugging Face home and real `tinkex serve` processes on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TINKER_TELEMETRY"] = os.environ.get("TINKER_TELEMETRY", "1")
ALICE = "tml-alice-key-0123456789"
BOB = "tml-bob-key-0123456789"


@pytest.fixture(scope="session", autouse=True)
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test process and server shares one private HF cache, where the built-in model is materialized."""
    home = tmp_path_factory.mktemp("hf-home")
    os.environ["HF_HOME"] = str(home)
    os.environ.pop("HF_HUB_CACHE", None)
    return home


@dataclass
class ServerProcess:
    base_url: str
    data_dir: Path
    process: subprocess.Popen
    args: list[str]

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            self.process.wait(timeout=30)

    def restart(self) -> ServerProcess:
        self.stop()
        fresh = start_server(self.data_dir, *self.args)
        self.process, self.base_url = fresh.process, fresh.base_url
        return self


def start_server(data_dir: Path, *args: str, timeout: float = 120.0) -> ServerProcess:
    command = [sys.executable, "-m", "tinkex.cli", "serve", "--port", "0", "--data-dir", str(data_dir),
               "--api-key", f"{ALICE}=alice", "--api-key", f"{BOB}=bob", "--threads", "1", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if line.startswith("tinkex serving on "):
            # Keep draining output so a chatty server never blocks on a full pipe.
            import threading

            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return ServerProcess(line.split()[-1], data_dir, process, list(args))
    process.kill()
    raise RuntimeError("tinkex serve did not start:\n" + "".join(lines))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on loopback (Debian's server binaries), for the store's second backend."""
    import getpass
    import shutil
    import socket
    import tempfile

    bin_dir = next(Path("/usr/lib/postgresql").glob("*/bin"), None)
    assert bin_dir is not None, "PostgreSQL server binaries are missing: apt-get install postgresql"
    root = Path(tempfile.mkdtemp(prefix="tinkex-pg-"))
    as_postgres: list[str] = []
    if getpass.getuser() == "root":  # postgres refuses to run as root
        shutil.chown(root, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "postgres",
                    "--auth=trust"], check=True, capture_output=True)
    server = subprocess.Popen([*as_postgres, str(bin_dir / "postgres"), "-D", str(root / "data"), "-p", str(port),
                               "-h", "127.0.0.1", "-k", str(root)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                         capture_output=True).returncode != 0:
        assert time.monotonic() < deadline and server.poll() is None, "PostgreSQL did not start"
        time.sleep(0.2)
    yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)
    shutil.rmtree(root, ignore_errors=True)


def fresh_database(postgres_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(postgres_url.replace("+psycopg", "") + "/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{postgres_url}/{name}"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, hf_home: Path) -> Iterator[ServerProcess]:
    """A `tinkex serve` process on SQLite (tests/server runs its tests on PostgreSQL as well)."""
    proc = start_server(tmp_path_factory.mktemp("server-data"))
    yield proc
    proc.stop()
