"""The wire protocol at the HTTP level: ordering, dedupe, zstd and JSON bodies, long-poll, auth, restarts."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import zstandard

from tinkex import types
from tinkex.server import ServerSettings

from ..conftest import ALICE, BOB, start_server

MODEL = "tinkex/tiny-qwen3"


class Api:
    def __init__(self, base_url: str, key: str = ALICE):
        self.http = httpx.Client(base_url=base_url + "/api/v1", headers={"X-API-Key": key}, timeout=60)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.http.post(path, **kwargs)

    def result(self, request_id: str, accept: str = "application/json") -> httpx.Response:
        while True:
            response = self.post("/retrieve_future", json={"request_id": request_id},
                                 headers={"Accept": accept})
            if response.status_code == 200 and response.headers["content-type"].startswith("application/json") \
                    and response.json().get("type") == "try_again":
                continue
            return response

    def session(self) -> str:
        return self.post("/create_session", json={"tags": [], "sdk_version": "test"}).json()["session_id"]

    def model(self, session_id: str, seq: int = 0, rank: int = 4) -> str:
        body = {"session_id": session_id, "model_seq_id": seq, "base_model": MODEL,
                "lora_config": {"rank": rank, "seed": 0}}
        future = self.post("/create_model", json=body).json()
        assert self.result(future["request_id"]).json()["model_id"] == future["model_id"]
        return future["model_id"]


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": np.array(tokens[1:]),
                                       "weights": np.ones(len(tokens) - 1, dtype=np.float32)})


def fb_body(model_id: str, seq_id: int, data: list[types.Datum], forward_only: bool = False) -> bytes:
    return types.encode_forward_backward_request(model_id, seq_id, data, "cross_entropy", None, forward_only)


PROTO = {"Content-Type": "application/x-protobuf"}


def test_client_config_and_auth(server):
    api = Api(server.base_url)
    assert api.post("/client/config", json={"sdk_version": "0.38.0"}).status_code == 200
    response = httpx.post(server.base_url + "/api/v1/create_session", json={"tags": []},
                          headers={"X-API-Key": "tml-not-a-key"})
    assert response.status_code == 401 and "API key" in response.json()["detail"]
    assert api.post("/telemetry", json={"events": [], "session_id": "x"}).json() == {"status": "accepted"}


def test_requests_run_in_seq_order_and_retries_dedupe(server):
    api = Api(server.base_url)
    model_id = api.model(api.session())
    batch = [datum([5, 6, 7, 8, 9])]
    lr = {"learning_rate": 0.01}
    # seq 1 forward, seq 2 forward_backward, seq 3 optim_step, seq 4 forward -- sent as 1, 4, 2, 3.
    before = api.post("/forward_backward", content=fb_body(model_id, 1, batch, forward_only=True), headers=PROTO)
    late = api.post("/forward_backward", content=fb_body(model_id, 4, batch, forward_only=True), headers=PROTO).json()
    step_fb = api.post("/forward_backward", content=fb_body(model_id, 2, batch), headers=PROTO).json()
    step = api.post("/optim_step", json={"model_id": model_id, "seq_id": 3, "adam_params": lr}).json()
    first = types.decode_forward_backward_output(api.result(before.json()["request_id"], "application/x-protobuf").content)
    after = types.decode_forward_backward_output(api.result(late["request_id"], "application/x-protobuf").content)
    assert api.result(step["request_id"]).status_code == 200
    assert api.result(step_fb["request_id"], "application/x-protobuf").status_code == 200
    # the forward that arrived early waited for the optimizer step: it sees the stepped weights,
    # exactly what a forward sent afterwards sees
    check = api.post("/forward_backward", content=fb_body(model_id, 5, batch, forward_only=True), headers=PROTO).json()
    settled = types.decode_forward_backward_output(api.result(check["request_id"], "application/x-protobuf").content)
    assert after.metrics["loss:sum"] != pytest.approx(first.metrics["loss:sum"], rel=1e-4)
    assert after.metrics["loss:sum"] == pytest.approx(settled.metrics["loss:sum"], rel=1e-6)
    # a retry of seq 3 (same model, same seq_id) gets the same future back
    again = api.post("/optim_step", json={"model_id": model_id, "seq_id": 3, "adam_params": lr}).json()
    assert again["request_id"] == step["request_id"]


def test_zstd_body_and_json_bodies_of_old_sdks(server):
    api = Api(server.base_url)
    model_id = api.model(api.session())
    batch = [datum([5, 6, 7, 8, 9]), datum([11, 12, 13])]
    compressed = zstandard.ZstdCompressor().compress(fb_body(model_id, 1, batch, forward_only=True))
    future = api.post("/forward_backward", content=compressed, headers={**PROTO, "Content-Encoding": "zstd"}).json()
    proto_result = types.decode_forward_backward_output(api.result(future["request_id"], "application/x-protobuf").content)
    # SDK 0.23: JSON body, JSON result (no protobuf in Accept)
    json_body = {"forward_backward_input": {"data": [d.to_json_dict() for d in batch], "loss_fn": "cross_entropy"},
                 "model_id": model_id, "seq_id": 2, "forward_only": True}
    future = api.post("/forward_backward", json=json_body).json()
    response = api.result(future["request_id"])
    assert response.headers["content-type"].startswith("application/json")
    json_result = types.ForwardBackwardOutput.model_validate(response.json())
    assert json_result.metrics["loss:sum"] == pytest.approx(proto_result.metrics["loss:sum"], rel=1e-6)
    assert json_result.loss_fn_outputs[1]["logprobs"].data == pytest.approx(
        proto_result.loss_fn_outputs[1]["logprobs"].data)
    # the /forward endpoint of old SDKs
    future = api.post("/forward", json={"forward_input": json_body["forward_backward_input"], "model_id": model_id,
                                        "seq_id": 3}).json()
    assert api.result(future["request_id"]).json()["metrics"]["loss:sum"] == pytest.approx(
        proto_result.metrics["loss:sum"], rel=1e-6)


def test_malformed_bodies_get_400_with_detail(server):
    api = Api(server.base_url)
    model_id = api.model(api.session())
    cases = [
        api.post("/forward_backward", content=b"\x0a\xff\xff garbage", headers=PROTO),
        api.post("/forward_backward", content=b"\x28\xb5\x2f\xfd broken", headers={**PROTO, "Content-Encoding": "zstd"}),
        api.post("/forward_backward", content=b"{not json", headers={"Content-Type": "application/json"}),
        api.post("/optim_step", json={"model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": -1}}),
        api.post("/create_model", json={"session_id": "nope"}),
        api.post("/asample", json={"prompt": {"chunks": []}, "num_samples": 1}),
    ]
    for response in cases:
        assert 400 <= response.status_code < 500, response.text
        assert isinstance(response.json()["detail"], str) and response.json()["detail"]
    missing = api.post("/retrieve_future", json={"request_id": "does-not-exist"})
    assert missing.status_code == 404
    # still serving; the rejected optim_step used up seq_id 1, as the SDK assumes, so seq_id 2 runs at once
    future = api.post("/forward_backward", content=fb_body(model_id, 2, [datum([1, 2, 3])], True), headers=PROTO)
    assert future.status_code == 200
    assert api.result(future.json()["request_id"], "application/x-protobuf").status_code == 200


def test_long_poll_holds_then_answers_try_again(tmp_path, hf_home):
    assert ServerSettings(data_dir=tmp_path).long_poll_seconds < 45  # the SDK's retrieve_future timeout
    slow = start_server(tmp_path / "data", "--long-poll-seconds", "3")
    try:
        api = Api(slow.base_url)
        session_id = api.session()
        model_id = f"{session_id}:train:0"
        api.post("/create_model", json={"session_id": session_id, "model_seq_id": 0, "base_model": MODEL,
                                        "lora_config": {"rank": 4}})
        # seq 2 can never run (seq 1 is missing): its poll is held, then answered with try_again
        future = api.post("/forward_backward", content=fb_body(model_id, 2, [datum([1, 2, 3])], True),
                          headers=PROTO).json()
        started = time.monotonic()
        answer = api.post("/retrieve_future", json={"request_id": future["request_id"]}, timeout=60).json()
        held = time.monotonic() - started
        assert answer["type"] == "try_again" and answer["queue_state"] == "active"
        assert 3 <= held < 10
    finally:
        slow.stop()


def test_other_tenants_get_404_everywhere(server):
    alice, bob = Api(server.base_url), Api(server.base_url, BOB)
    session_id = alice.session()
    model_id = alice.model(session_id)
    future = alice.post("/save_weights", json={"model_id": model_id, "path": "mine", "seq_id": 1}).json()
    path = alice.result(future["request_id"]).json()["path"]
    run_id, checkpoint_id = model_id, "weights/mine"
    assert bob.post("/get_info", json={"model_id": model_id}).status_code == 404
    assert bob.post("/forward_backward", content=fb_body(model_id, 2, [datum([1, 2, 3])]),
                    headers=PROTO).status_code == 404
    assert bob.post("/optim_step", json={"model_id": model_id, "seq_id": 2, "adam_params": {}}).status_code == 404
    # a seq_id alice already used must not hand bob her future (the retry dedupe checks the owner first)
    assert bob.post("/save_weights", json={"model_id": model_id, "path": "mine", "seq_id": 1}).status_code == 404
    assert bob.post("/create_model", json={"session_id": session_id, "model_seq_id": 0, "base_model": MODEL,
                                           "lora_config": {"rank": 4}}).status_code == 404
    assert bob.post("/retrieve_future", json={"request_id": future["request_id"]}).status_code == 404
    assert bob.post("/weights_info", json={"tinker_path": path}).status_code == 404
    assert bob.http.get(f"/training_runs/{run_id}").status_code == 404
    assert bob.http.get(f"/training_runs/{run_id}/checkpoints").status_code == 404
    assert bob.http.delete(f"/training_runs/{run_id}/checkpoints/{checkpoint_id}").status_code == 404
    assert bob.http.get(f"/sessions/{session_id}").status_code == 404
    assert bob.post("/create_sampling_session", json={"session_id": session_id, "sampling_session_seq_id": 0,
                                                      "base_model": MODEL}).status_code == 404
    assert bob.post("/create_model", json={"session_id": session_id, "model_seq_id": 5, "base_model": MODEL,
                                           "lora_config": {"rank": 4}}).status_code == 404
    # bob's own session cannot load alice's checkpoint either
    bob_session = bob.session()
    assert bob.post("/load_weights", json={"session_id": bob_session, "model_seq_id": 0, "path": path,
                                           "optimizer": True}).status_code == 404
    # checkpoint names cannot escape their directory
    escape = alice.post("/save_weights", json={"model_id": model_id, "path": "../../etc", "seq_id": 2})
    assert escape.status_code == 400


def test_restart_keeps_runs_checkpoints_and_results(tmp_path, hf_home):
    proc = start_server(tmp_path / "data")
    try:
        api = Api(proc.base_url)
        session_id = api.session()
        model_id = api.model(session_id)
        save = api.post("/save_weights", json={"model_id": model_id, "path": "before-restart", "seq_id": 1}).json()
        path = api.result(save["request_id"]).json()["path"]
        proc.restart()
        api = Api(proc.base_url)
        # the finished result is still there, the run and its checkpoint too
        assert api.result(save["request_id"]).json()["path"] == path
        assert api.http.get(f"/training_runs/{model_id}").json()["training_run_id"] == model_id
        listed = api.http.get(f"/training_runs/{model_id}/checkpoints").json()["checkpoints"]
        assert [c["tinker_path"] for c in listed] == [path]
        # the live weights are gone, and the server says so plainly
        gone = api.post("/forward_backward", content=fb_body(model_id, 2, [datum([1, 2, 3])]), headers=PROTO)
        assert gone.status_code == 404 and "checkpoint" in gone.json()["detail"]
        # a new model resumes from the checkpoint
        new_session = api.session()
        load = api.post("/load_weights", json={"session_id": new_session, "model_seq_id": 0, "path": path,
                                               "optimizer": True}).json()
        assert api.result(load["request_id"]).json()["model_id"] == f"{new_session}:train:0"
    finally:
        proc.stop()


def test_sampling_after_the_session_finished_is_refused(server):
    """The sampling route answers from memory after a sampler's first request; a session finished
    since (or expired) still refuses further samples with 410, and another tenant's sampler is 404."""
    alice, bob = Api(server.base_url), Api(server.base_url, BOB)
    session_id = alice.session()
    sampler_id = alice.post("/create_sampling_session", json={"session_id": session_id, "sampling_session_seq_id": 0,
                                                              "base_model": MODEL}).json()["sampling_session_id"]
    body = {"sampling_session_id": sampler_id, "num_samples": 1, "prompt": {"chunks": [
        {"type": "encoded_text", "tokens": [5, 6, 7]}]}, "sampling_params": {"max_tokens": 2}}
    future = alice.post("/asample", json={**body, "seq_id": 0}).json()
    assert len(alice.result(future["request_id"]).json()["sequences"]) == 1
    assert bob.post("/asample", json={**body, "seq_id": 1}).status_code == 404
    assert alice.http.post(f"/sessions/{session_id}/finish", json={"reason": {"type": "success"}}).status_code == 200
    refused = alice.post("/asample", json={**body, "seq_id": 2})
    assert refused.status_code == 410 and "finished" in refused.json()["detail"]


def test_the_schema_says_which_routes_need_the_api_key(server):
    """A route answers 401 without a key exactly when the OpenAPI schema lists the key as its security."""
    http = httpx.Client(base_url=server.base_url, timeout=60)
    schema = http.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["APIKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    secured = open_routes = 0
    for path, operations in schema["paths"].items():
        url = path.replace("{", "").replace("}", "").replace(":path", "")  # any value will do for ids
        for method, operation in operations.items():
            response = http.request(method.upper(), url, json={})
            listed = operation.get("security") == [{"APIKey": []}, {"Bearer": []}]
            assert (response.status_code == 401) == listed, (method, path, response.status_code, response.text)
            secured += listed
            open_routes += not listed
    assert secured > 30 and open_routes >= 3  # the training, sampling and REST routes; healthz, config
