"""Pure client logic: chunking, metric merging, configuration, tokenizer ids, pickled state."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tinker  # the official SDK, as the reference for metric merging

from tinkex import types
from tinkex.client import _config
from tinkex.client._chunking import chunk_data, combine_outputs, datum_bytes, merge_metrics
from tinkex.client._constants import DEFAULT_BASE_URL, HEARTBEAT_INTERVAL_S
from tinkex.client._tokenizer import load_kwargs_for, tokenizer_id_for


def _datum(n_tokens: int) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(list(range(n_tokens))),
                       loss_fn_inputs={"target_tokens": list(range(n_tokens)), "weights": [1.0] * n_tokens})


def test_chunks_by_datum_count_and_order():
    data = [_datum(2) for _ in range(2050)]
    chunks = chunk_data(data, max_len=1024, max_bytes=5_000_000)
    assert [len(c) for c in chunks] == [1024, 1024, 2]
    assert [d for c in chunks for d in c] == data


def test_chunks_by_estimated_bytes():
    # 4 bytes per token + 8 (int64 target) + 4 (float32 weight) per position = 16 bytes per token.
    assert datum_bytes(_datum(1000)) == 16_000
    chunks = chunk_data([_datum(1000) for _ in range(10)], max_len=1024, max_bytes=40_000)
    assert [len(c) for c in chunks] == [2, 2, 2, 2, 2]
    image = types.Datum(model_input=types.ModelInput(chunks=[types.ImageChunk(data=b"x" * 5000, format="png",
                                                                              expected_tokens=4)]))
    assert datum_bytes(image) == 5000
    # A datum larger than the limit still travels, alone.
    assert [len(c) for c in chunk_data([_datum(10), _datum(5000), _datum(10)], 1024, 1000)] == [1, 1, 1]


def _output(n: int, metrics: dict[str, float]) -> types.ForwardBackwardOutput:
    return types.ForwardBackwardOutput(
        loss_fn_outputs=[{"logprobs": types.TensorData.from_numpy(np.full(3, -float(i), dtype=np.float32))}
                         for i in range(n)], metrics=metrics)


def test_metrics_merge_by_reduction_suffix_like_the_official_sdk():
    from tinker.lib.chunked_fwdbwd_helpers import combine_fwd_bwd_output_results

    chunks = [
        (3, {"loss:sum": 6.0, "acc:mean": 0.5, "lo:min": 1.0, "hi:max": 2.0, "lag:slack": 1.0, "h:hash2": 2.0**63,
             "run:unique": 11.0, "odd:median": 1.0, "only_first:sum": 1.0}),
        (1, {"loss:sum": 4.0, "acc:mean": 1.0, "lo:min": -1.0, "hi:max": 7.0, "lag:slack": 3.0, "h:hash2": 2.0**63,
             "run:unique": 12.0, "odd:median": 2.0}),
        (4, {"loss:sum": 1.0, "acc:mean": 0.25, "lo:min": 0.0, "hi:max": 1.0, "lag:slack": 2.0, "h:hash2": 5.0,
             "run:unique": 13.0, "odd:median": 3.0}),
    ]
    ours = merge_metrics([_output(n, m) for n, m in chunks])
    assert ours["loss:sum"] == 11.0
    assert ours["acc:mean"] == pytest.approx((3 * 0.5 + 1 * 1.0 + 4 * 0.25) / 8)
    assert ours["lo:min"] == -1.0 and ours["hi:max"] == 7.0
    assert ours["lag:slack"] == pytest.approx(3.0 - (3 * 1 + 1 * 3 + 4 * 2) / 8)
    assert ours["h:hash2"] == 5.0  # 2**63 + 2**63 wraps to 0 in uint64
    assert (ours["run:unique"], ours["run:unique_1"], ours["run:unique_2"]) == (11.0, 12.0, 13.0)
    assert "odd:median" not in ours and "only_first:sum" not in ours

    official = combine_fwd_bwd_output_results([
        tinker.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", metrics=m,
                                     loss_fn_outputs=[{} for _ in range(n)]) for n, m in chunks])
    assert ours == pytest.approx(official.metrics)


def test_combined_outputs_concatenate_in_chunk_order():
    merged = combine_outputs([_output(2, {"loss:sum": 1.0}), _output(1, {"loss:sum": 2.0})])
    assert [o["logprobs"].data[0] for o in merged.loss_fn_outputs] == [0.0, -1.0, 0.0]
    assert merged.metrics == {"loss:sum": 3.0}
    assert merged.loss_fn_output_type == "ArrayRecord"


def test_configuration_precedence(monkeypatch):
    monkeypatch.setenv("TINKER_BASE_URL", "http://env.example/")
    monkeypatch.setenv("TINKER_API_KEY", "tml-env")
    assert _config.resolve() == _config.Connection("http://env.example", "tml-env")
    assert _config.resolve("http://arg.example", "tml-arg") == _config.Connection("http://arg.example", "tml-arg")
    monkeypatch.setenv("TINKER_BASE_URL", "")  # empty counts as unset: a key alone means the hosted service
    assert _config.resolve().base_url == DEFAULT_BASE_URL
    with pytest.raises(types.TinkerError, match="tml-"):
        _config.resolve("http://x", "sk-wrong")
    monkeypatch.delenv("TINKER_API_KEY")
    monkeypatch.setenv("HOME", "/nonexistent-home")
    with pytest.raises(types.TinkerError, match="API key"):
        _config.resolve("http://only-url.example")
    monkeypatch.setenv("TINKER_CREDENTIAL_CMD", "echo tml-from-command")
    assert _config.resolve("http://x").api_key == "tml-from-command"


def test_tokenizer_ids():
    assert tokenizer_id_for("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    assert tokenizer_id_for("Qwen/Qwen3-8B:peft:1") == "Qwen/Qwen3-8B"
    assert tokenizer_id_for("org/model/variant") == "org/model"
    assert tokenizer_id_for("meta-llama/Llama-3.1-8B") == "thinkingmachineslabinc/meta-llama-3-instruct-tokenizer"
    assert tokenizer_id_for("anything", "tok/id:suffix") == "tok/id"
    repo, kwargs = load_kwargs_for("moonshotai/Kimi-K2.5-Text-Only")
    assert repo == "moonshotai/Kimi-K2.5" and kwargs["trust_remote_code"] and len(kwargs["revision"]) == 40


def test_heartbeat_interval_is_ten_seconds():
    assert HEARTBEAT_INTERVAL_S == 10.0


def test_exceptions_pickle():
    import httpx

    request = httpx.Request("POST", "http://x/api/v1/y")
    response = httpx.Response(404, request=request, json={"detail": "x"})
    for error in [types.NotFoundError("Error code: 404", response=response, body={"detail": "x"}),
                  types.APIConnectionError(request), types.APITimeoutError(request),
                  types.RequestFailedError("boom", "req-1", "user")]:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)


def test_sampling_pool_uses_pyqwest_and_the_rest_httpx(monkeypatch):
    """Sampling (many requests in flight) rides pyqwest's transport, everything else httpx's own;
    TINKEX_HTTP_TRANSPORT puts every pool on one of them."""
    import httpx
    from pyqwest.httpx import AsyncPyqwestTransport

    from tinkex.client._transport import Transport

    def pool(purpose: str):
        return Transport("http://127.0.0.1:1", "tml-test-key").client(purpose)._transport

    monkeypatch.delenv("TINKEX_HTTP_TRANSPORT", raising=False)
    assert isinstance(pool("sample"), AsyncPyqwestTransport)
    for purpose in ("session", "train", "retrieve", "rest", "telemetry"):
        assert isinstance(pool(purpose), httpx.AsyncHTTPTransport)
    monkeypatch.setenv("TINKEX_HTTP_TRANSPORT", "httpx")
    assert isinstance(pool("sample"), httpx.AsyncHTTPTransport)
    monkeypatch.setenv("TINKEX_HTTP_TRANSPORT", "pyqwest")
    assert isinstance(pool("train"), AsyncPyqwestTransport)
