"""Thousands of bad requests: schema-driven fuzzing of every route, plus broken protobuf and zstd bodies.

Every answer must be a 4xx with a `detail` (never a 5xx), and the server must serve normally after.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tinkex import types

from ..conftest import ALICE
from .test_protocol import PROTO, Api, datum, fb_body

def test_every_route_answers_bad_input_with_a_4xx(server):
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25
    sent = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                      database=None)
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(headers={"X-API-Key": ALICE}, timeout=60)
                sent.append(response.status_code)
                assert response.status_code < 500, (case.method, case.path, response.status_code,
                                                    response.text[:500])
                if response.status_code >= 400:
                    assert response.json().get("detail"), (case.path, response.text[:500])

            try:
                check()
            except Unsatisfiable:  # an operation without inputs has no invalid form
                assert mode is GenerationMode.NEGATIVE

    assert len(sent) > 1000 and any(400 <= status < 500 for status in sent)


@pytest.fixture(scope="module")
def live_model(server):
    api = Api(server.base_url)
    return api, api.model(api.session())


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
@given(blob=st.binary(max_size=512), compressed=st.booleans())
def test_random_bytes_as_forward_backward(live_model, blob, compressed):
    api, _ = live_model
    headers = dict(PROTO)
    if compressed:
        headers["Content-Encoding"] = "zstd"
    response = api.post("/forward_backward", content=blob, headers=headers)
    assert 400 <= response.status_code < 500 and response.json()["detail"], response.text[:300]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
@given(cut=st.integers(min_value=0, max_value=10_000), flip=st.integers(min_value=0, max_value=10_000),
       value=st.integers(min_value=0, max_value=255), compressed=st.booleans())
def test_truncated_and_corrupted_protobuf(live_model, cut, flip, value, compressed):
    api, model_id = live_model
    # seq_id far ahead: a body that happens to stay valid queues harmlessly instead of training
    body = bytearray(fb_body(model_id, 1_000_000, [datum([5, 6, 7, 8]), datum([9, 10, 11])]))
    body[flip % len(body)] = value
    body = bytes(body[: cut % (len(body) + 1)])
    headers = dict(PROTO)
    if compressed:
        body = zstandard.ZstdCompressor().compress(body)[: max(1, cut % 64)]
        headers["Content-Encoding"] = "zstd"
    response = api.post("/forward_backward", content=body, headers=headers)
    assert response.status_code < 500, response.text[:300]
    if response.status_code >= 400:
        assert response.json()["detail"]


def test_still_serving_after_the_fuzz(server):
    api = Api(server.base_url)
    model_id = api.model(api.session())
    future = api.post("/forward_backward", content=fb_body(model_id, 1, [datum([1, 2, 3, 4])]), headers=PROTO)
    result = types.decode_forward_backward_output(api.result(future.json()["request_id"], PROTO["Content-Type"]).content)
    assert result.metrics["loss:sum"] > 0
    assert httpx.get(server.base_url + "/api/v1/healthz").json() == {"status": "ok"}
