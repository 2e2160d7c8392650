"""Fixtures for the SDK tests: clients against the real `tinkex serve` process (from tests/conftest.py),
an in-process server with fault injection, and the HTTP helpers in `_http`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import tinkex
from tinkex import types

from ..conftest import ALICE
from ._http import RecordingProxy, ScriptedServer

MODEL = "tinkex/tiny-qwen3"


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests pass base_url/api_key explicitly; the environment must not decide for them."""
    for name in ("TINKER_BASE_URL", "TINKER_API_KEY", "TINKER_CREDENTIAL_CMD", "TINKER_PROJECT_ID", "TINKER_TAGS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def service_client(server) -> Iterator[tinkex.ServiceClient]:
    client = tinkex.ServiceClient(base_url=server.base_url, api_key=ALICE)
    yield client
    client.close().result(30)


@pytest.fixture(scope="session")
def tokenizer(service_client):
    trainer = service_client.create_lora_training_client(MODEL, rank=4).result(60)
    return trainer.get_tokenizer()


@pytest.fixture
def trainer(service_client) -> tinkex.TrainingClient:
    """A fresh LoRA training client (cheap on the built-in model)."""
    return service_client.create_lora_training_client(MODEL, rank=8, seed=0).result(60)


@pytest.fixture(scope="session")
def base_sampler(service_client) -> tinkex.SamplingClient:
    return service_client.create_sampling_client(base_model=MODEL).result(60)


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory, hf_home: Path):
    """An in-process server whose test-only fault injection is switched on."""
    from tinkex.server import EmbeddedServer

    server = EmbeddedServer(data_dir=tmp_path_factory.mktemp("fault-server"), api_keys={ALICE: "alice"},
                            fault_injection=True).start()
    yield server
    server.stop()


def inject_fault(server, path: str, status: int, count: int) -> None:
    import httpx

    response = httpx.post(f"{server.base_url}/api/v1/_test/faults", headers={"x-api-key": ALICE},
                          json={"path": path, "status": status, "count": count})
    response.raise_for_status()


@pytest.fixture
def proxy(server) -> Iterator[RecordingProxy]:
    proxy = RecordingProxy(server.base_url).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    fake = ScriptedServer().start()
    yield fake
    fake.stop()


def sft_datum(tokens: list[int], weight: float = 1.0) -> types.Datum:
    """Next-token prediction over `tokens`."""
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [weight] * (len(tokens) - 1)})
