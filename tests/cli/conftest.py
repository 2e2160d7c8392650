"""Fixtures for the `tinkex` command's tests: a CliRunner bound to the shared `tinkex serve` process."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner, Result

from tinkex.cli import main

from ..conftest import ALICE


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TINKER_BASE_URL", "TINKER_API_KEY", "TINKER_CREDENTIAL_CMD", "TINKER_PROJECT_ID", "TINKER_TAGS"):
        monkeypatch.delenv(name, raising=False)


class Cli:
    def __init__(self, base_url: str, api_key: str = ALICE):
        self.base_url, self.api_key = base_url, api_key
        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | None = None, connect: bool = True) -> Result:
        prefix = ["--base-url", self.base_url, "--api-key", self.api_key] if connect else []
        return self.runner.invoke(main, [*prefix, *args], input=input, catch_exceptions=False)

    def json(self, *args: str) -> dict:
        result = self(*args, "--format", "json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)


@pytest.fixture
def cli(server) -> Cli:
    return Cli(server.base_url)
