"""The server's own tests run once per store backend: SQLite, and PostgreSQL on a throwaway cluster."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import ServerProcess, fresh_database, start_server


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           hf_home: Path) -> Iterator[ServerProcess]:
    args = []
    if request.param == "postgresql":
        args = ["--database-url", fresh_database(request.getfixturevalue("postgres_url"), "tinkex_server")]
    proc = start_server(tmp_path_factory.mktemp(f"server-data-{request.param}"), *args)
    yield proc
    proc.stop()
