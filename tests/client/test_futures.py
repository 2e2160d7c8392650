"""The retrieve_future long-poll protocol and APIFuture, against a scripted server on loopback."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import numpy as np
import pytest

from tinkex import types
from tinkex.client import _loop
from tinkex.client._config import Connection
from tinkex.client._futures import APIFuture, RetryableException, poll_result, run_in_sdk_loop
from tinkex.client._holder import Holder

from ._http import Reply

RETRIEVE = "/api/v1/retrieve_future"


def _poll(scripted, request_type="OptimStep", **kwargs):
    holder = Holder(Connection(scripted.base_url, "tml-test"), with_session=False)
    kwargs.setdefault("result_model", types.OptimStepResponse)
    return run_in_sdk_loop(poll_result(holder, "req-1", request_type, **kwargs)).result(30)


def test_try_again_is_repolled_and_the_result_validated(scripted):
    states = []
    scripted.script(RETRIEVE,
                    Reply(200, {"type": "try_again", "request_id": "req-1", "queue_state": "active"}),
                    Reply(200, {"type": "try_again", "request_id": "req-1", "queue_state": "paused_capacity",
                                "queue_state_reason": "busy"}),
                    Reply(200, {"metrics": {"grad_norm:mean": 1.5}}))
    result = _poll(scripted, on_queue_state=lambda s, r: states.append((s, r)), roundtrip_s=0.25)
    assert result == types.OptimStepResponse(metrics={"grad_norm:mean": 1.5})
    polls = scripted.requests_to(RETRIEVE)
    assert [p.headers["x-tinker-request-iteration"] for p in polls] == ["0", "1", "2"]
    assert all(p.headers["x-tinker-request-type"] == "OptimStep" for p in polls)
    assert "x-tinker-create-promise-roundtrip-time" in polls[0].headers
    assert "x-tinker-create-promise-roundtrip-time" not in polls[1].headers
    assert polls[0].json() == {"request_id": "req-1", "allow_metadata_only": True}
    assert states == [("active", None), ("paused_capacity", "busy")]


def test_metadata_only_answer_is_followed_by_a_full_fetch(scripted):
    scripted.script(RETRIEVE, Reply(200, {"status": "complete_metadata", "response_payload_size": 123}),
                    Reply(200, {"metrics": None}))
    assert _poll(scripted).metrics is None
    first, second = scripted.requests_to(RETRIEVE)
    assert first.json()["allow_metadata_only"] is True and second.json()["allow_metadata_only"] is False


def test_failed_request_raises_request_failed_error(scripted):
    scripted.script(RETRIEVE, Reply(200, {"error": "bad targets", "category": "user"}))
    with pytest.raises(types.RequestFailedError) as info:
        _poll(scripted)
    assert info.value.request_id == "req-1" and info.value.category == types.RequestErrorCategory.User
    assert info.value.message == "bad targets"


def test_408_and_5xx_are_repolled(scripted):
    scripted.script(RETRIEVE, Reply(408, {"type": "try_again", "request_id": "req-1", "queue_state": "active"}),
                    Reply(502, {"detail": "gateway"}), Reply(500, {"detail": "oops"}),
                    Reply(200, {"metrics": {}}))
    assert _poll(scripted).metrics == {}
    assert len(scripted.requests_to(RETRIEVE)) == 4


def test_429_backs_off_before_repolling(scripted):
    scripted.script(RETRIEVE, Reply(429, {"detail": "slow"}), Reply(200, {"metrics": {}}))
    started = time.monotonic()
    _poll(scripted)
    assert time.monotonic() - started >= 0.9  # min(2**0, 30) s


def test_spurious_400s_are_retried_three_times(scripted):
    scripted.script(RETRIEVE, *[Reply(400, {"detail": "proxy"})] * 3, Reply(200, {"metrics": {}}))
    assert _poll(scripted).metrics == {}
    scripted.script(RETRIEVE, *[Reply(400, {"detail": "proxy"})] * 4)
    with pytest.raises(ValueError):
        _poll(scripted)


def test_410_is_retryable_and_404_fatal(scripted):
    scripted.script(RETRIEVE, Reply(410, {"detail": "expired"}))
    with pytest.raises(RetryableException):
        _poll(scripted)
    scripted.script(RETRIEVE, Reply(404, {"detail": "unknown request"}))
    with pytest.raises(types.NotFoundError) as info:
        _poll(scripted)
    # Typed, and a ValueError as the official SDK's polling errors are.
    assert isinstance(info.value, ValueError)
    assert "Error retrieving result" in str(info.value)


def test_protobuf_results_are_decoded(scripted):
    output = types.ForwardBackwardOutput(
        loss_fn_outputs=[{"logprobs": types.TensorData.from_numpy(np.array([-1.0, -2.0], dtype=np.float32))}],
        metrics={"loss:sum": 3.0})
    scripted.script(RETRIEVE, Reply(200, types.encode_forward_backward_output(output),
                                    {"content-type": "application/x-protobuf"}))
    result = _poll(scripted, "ForwardBackward", result_model=None,
                   proto_decoder=types.decode_forward_backward_output)
    assert result.metrics == {"loss:sum": 3.0}
    assert result.loss_fn_outputs[0]["logprobs"].to_numpy().tolist() == [-1.0, -2.0]
    assert scripted.requests_to(RETRIEVE)[0].headers["accept"] == "application/x-protobuf"


def test_invalid_result_is_a_validation_error(scripted):
    scripted.script(RETRIEVE, Reply(200, {"model_data": "not an object"}))
    with pytest.raises(types.APIResponseValidationError):
        _poll(scripted, "CreateModel", result_model=types.GetInfoResponse)


async def _value(x, delay=0.05):
    await asyncio.sleep(delay)
    return x


def test_api_future_from_sync_and_async_code():
    future = run_in_sdk_loop(_value(7))
    assert isinstance(future, APIFuture)
    assert future.result(timeout=5) == 7
    assert isinstance(future.future(), concurrent.futures.Future)

    async def main():
        futures = [run_in_sdk_loop(_value(i)) for i in range(20)]
        direct = await asyncio.gather(*futures)
        via = await asyncio.gather(*(f.result_async() for f in futures))
        coro = await futures[3].coroutine()
        return direct, via, coro

    direct, via, coro = asyncio.run(main())
    assert direct == via == list(range(20)) and coro == 3


def test_api_future_timeouts_and_loop_guard():
    slow = run_in_sdk_loop(_value(1, delay=0.5))
    with pytest.raises(TimeoutError):
        slow.result(timeout=0.05)
    assert slow.result(timeout=5) == 1  # a timed-out wait does not cancel the work

    async def wait_short():
        return await run_in_sdk_loop(_value(1, delay=0.5)).result_async(timeout=0.05)

    with pytest.raises(TimeoutError):
        asyncio.run(wait_short())

    async def blocking_on_sdk_loop():
        return run_in_sdk_loop(_value(2)).result()

    with pytest.raises(RuntimeError):
        _loop.submit(blocking_on_sdk_loop()).result(5)
