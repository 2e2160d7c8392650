"""The sampling wire exchange, observed on a scripted server: request bodies, image chunks, backpressure
that resubmits the same seq_id, whole-request retries with a new one, and sequence-id stamping."""

from __future__ import annotations

import base64
import time

import pytest

import tinkex
from tinkex import types

from ._http import Reply

PNG = b"\x89PNG\r\n\x1a\n fake image bytes"


def _result(n: int = 1) -> bytes:
    return types.encode_sample_response(types.SampleResponse(sequences=[
        types.SampledSequence(stop_reason="length", tokens=[5, 6], logprobs=[-0.5, -0.25]) for _ in range(n)]))


@pytest.fixture
def sampler(scripted):
    scripted.defaults["/api/v1/create_sampling_session"] = Reply(body={"sampling_session_id": "sess-1:sample:0"})
    scripted.defaults["/api/v1/retrieve_future"] = Reply(200, _result(), {"content-type": "application/x-protobuf"})
    client = tinkex.ServiceClient(base_url=scripted.base_url, api_key="tml-fake")
    yield client.create_sampling_client(base_model="some/model").result(30)
    client.close().result(30)


def test_request_body_with_image_chunks(scripted, sampler):
    scripted.script("/api/v1/asample", Reply(body={"request_id": "r1", "sample_sequence_ids": ["seq-a"]}))
    prompt = types.ModelInput(chunks=[
        types.EncodedTextChunk(tokens=[1, 2]),
        types.ImageChunk(data=PNG, format="png", expected_tokens=4),
        types.ImageAssetPointerChunk(format="jpeg", location="s3://bucket/cat.jpg", expected_tokens=3),
    ])
    params = types.SamplingParams(max_tokens=7, seed=3, stop=["\n"], temperature=0.5, top_k=20, top_p=0.9)
    response = sampler.sample(prompt, 1, params, include_prompt_logprobs=True, topk_prompt_logprobs=2,
                              topk_sample_logprobs=1).result(30)
    assert response.sequences[0].tokens == [5, 6] and response.sequences[0].sequence_id == "seq-a"
    body = scripted.requests_to("/api/v1/asample")[0].json()
    assert body == {
        "num_samples": 1,
        "prompt": {"chunks": [
            {"tokens": [1, 2], "type": "encoded_text"},
            {"data": base64.b64encode(PNG).decode(), "format": "png", "expected_tokens": 4, "type": "image"},
            {"format": "jpeg", "location": "s3://bucket/cat.jpg", "expected_tokens": 3,
             "type": "image_asset_pointer"}]},
        "sampling_params": {"max_tokens": 7, "seed": 3, "stop": ["\n"], "temperature": 0.5, "top_k": 20,
                            "top_p": 0.9},
        "sampling_session_id": "sess-1:sample:0", "seq_id": 0, "prompt_logprobs": True,
        "topk_prompt_logprobs": 2, "topk_sample_logprobs": 1, "prompt_alt_tokens_k": 0,
        "record_stability_info": False, "type": "sample"}
    headers = scripted.requests_to("/api/v1/asample")[0].headers
    assert headers["x-tinker-sampling-backpressure"] == "1"
    assert headers["x-sdk-method"] == "SamplingClient.sample"
    poll = scripted.requests_to("/api/v1/retrieve_future")[0]
    assert poll.headers["x-tinker-request-type"] == "Sample" and poll.headers["accept"] == "application/x-protobuf"


def test_429_resubmits_the_same_seq_id_after_the_server_delay(scripted, sampler):
    scripted.script("/api/v1/asample",
                    Reply(429, {"detail": "backpressure"}, {"retry-after-ms": "200"}),
                    Reply(429, {"detail": "backpressure"}, {"retry-after-ms": "200"}),
                    Reply(body={"request_id": "r1", "sample_sequence_ids": ["seq-a"]}))
    started = time.monotonic()
    sampler.sample(types.ModelInput.from_ints([1]), 1, types.SamplingParams()).result(30)
    posts = scripted.requests_to("/api/v1/asample")
    assert [p.json()["seq_id"] for p in posts] == [0, 0, 0]
    assert time.monotonic() - started >= 0.4


def test_whole_request_retry_takes_a_new_seq_id(scripted, sampler):
    scripted.script("/api/v1/asample", Reply(body={"request_id": "r1", "sample_sequence_ids": ["a"]}),
                    Reply(body={"request_id": "r2", "sample_sequence_ids": ["b"]}))
    scripted.script("/api/v1/retrieve_future", Reply(410, {"detail": "promise expired"}))
    response = sampler.sample(types.ModelInput.from_ints([1]), 1, types.SamplingParams()).result(30)
    assert response.sequences[0].sequence_id == "b"
    assert [p.json()["seq_id"] for p in scripted.requests_to("/api/v1/asample")] == [0, 1]


def test_request_failure_is_not_retried(scripted, sampler):
    scripted.script("/api/v1/asample", Reply(body={"request_id": "r1", "sample_sequence_ids": ["a"]}))
    scripted.script("/api/v1/retrieve_future", Reply(200, {"error": "prompt too long", "category": "user"}))
    with pytest.raises(types.RequestFailedError, match="prompt too long"):
        sampler.sample(types.ModelInput.from_ints([1]), 1, types.SamplingParams()).result(30)
    assert len(scripted.requests_to("/api/v1/asample")) == 1


def test_mismatched_sequence_ids_are_refused(scripted, sampler):
    scripted.script("/api/v1/asample", Reply(body={"request_id": "r1", "sample_sequence_ids": ["a", "b"]}))
    with pytest.raises(types.TinkerError):
        sampler.sample(types.ModelInput.from_ints([1]), 2, types.SamplingParams()).result(30)


def test_client_side_argument_checks(sampler):
    prompt = types.ModelInput.from_ints([1, 2, 3])
    with pytest.raises(ValueError):
        sampler.sample(prompt, 1, types.SamplingParams(), prompt_alt_tokens_k=-1)
    with pytest.raises(ValueError):
        sampler.sample(prompt, 1, types.SamplingParams(), include_prompt_logprobs=True, prompt_logprobs_last_n=0)
    with pytest.raises(ValueError):
        sampler.sample(prompt, 1, types.SamplingParams(),
                       target_prompt_logprobs=types.TensorData(data=[0.5], dtype="float32", shape=[1, 1]))
