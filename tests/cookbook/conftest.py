"""Cookbook fixtures: one embedded tinkex server for the directory, and a tinkex SDK client on it.

Real server, real built-in model, no mocks. `tests/conftest.py` supplies the offline HF home and
the standalone `tinkex serve` process (`server`) used by the compatibility tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

KEY = "tml-cookbook-key-0123456789"


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory, hf_home) -> Iterator[object]:
    from tinkex.server import EmbeddedServer

    server = EmbeddedServer(data_dir=tmp_path_factory.mktemp("cookbook-server"), api_keys={KEY: "cookbook"}).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def service_client(embedded):
    import tinkex

    return tinkex.ServiceClient(base_url=embedded.base_url, api_key=KEY)
