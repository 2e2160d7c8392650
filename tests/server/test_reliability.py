"""Crashes: kill -9 with requests in flight loses nothing that finished; corrupt checkpoints fail clearly."""

from __future__ import annotations

import time
from pathlib import Path

from ..conftest import start_server
from .test_protocol import PROTO, Api, datum, fb_body


def test_kill_9_with_requests_in_flight(tmp_path, hf_home):
    proc = start_server(tmp_path / "data")
    api = Api(proc.base_url)
    session_id = api.session()
    model_id = api.model(session_id)
    saved = api.post("/save_weights", json={"model_id": model_id, "path": "safe", "seq_id": 1}).json()
    path = api.result(saved["request_id"]).json()["path"]
    # a queue of work, the last of it still running or waiting when the process dies
    long_batch = [datum(list(range(3, 200)))] * 16
    in_flight = [api.post("/forward_backward", content=fb_body(model_id, seq, long_batch), headers=PROTO).json()
                 for seq in range(2, 12)]
    proc.stop(kill=True)

    proc.restart()
    api = Api(proc.base_url)
    # what finished is still there, exactly as it was
    assert api.result(saved["request_id"]).json()["path"] == path
    assert [c["tinker_path"] for c in api.http.get(f"/training_runs/{model_id}/checkpoints").json()["checkpoints"]] \
        == [path]
    # what was in flight either finished before the kill or tells the SDK to resubmit (410): never a hang
    statuses = {api.post("/retrieve_future", json={"request_id": f["request_id"]}, timeout=10).status_code
                for f in in_flight}
    assert statuses <= {200, 410} and 410 in statuses
    # and the saved state resumes into a new model
    new_session = api.session()
    load = api.post("/load_weights", json={"session_id": new_session, "model_seq_id": 0, "path": path,
                                           "optimizer": True}).json()
    assert api.result(load["request_id"]).json()["model_id"] == f"{new_session}:train:0"
    proc.stop()


def test_a_corrupt_checkpoint_fails_clearly_and_names_itself(tmp_path, hf_home):
    proc = start_server(tmp_path / "data")
    try:
        api = Api(proc.base_url)
        model_id = api.model(api.session())
        saved = api.post("/save_weights", json={"model_id": model_id, "path": "to-corrupt", "seq_id": 1}).json()
        path = api.result(saved["request_id"]).json()["path"]
        weights = next(Path(tmp_path / "data" / "checkpoints").rglob("to-corrupt/adapter_model.safetensors"))
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
        load = api.post("/load_weights", json={"session_id": api.session(), "model_seq_id": 0, "path": path,
                                               "optimizer": True}).json()
        answer = api.result(load["request_id"])
        assert answer.status_code == 200
        failure = answer.json()
        assert failure["category"] == "user" and "to-corrupt" in failure["error"]
        # the server is unharmed
        assert api.model(api.session())
    finally:
        proc.stop()


def test_sessions_without_heartbeats_expire_and_free_their_adapters(tmp_path, hf_home):
    from tinkex.server import EmbeddedServer

    with EmbeddedServer(data_dir=tmp_path / "data", api_keys={"tml-expiry-key-0001": "t"},
                        session_timeout_seconds=2.0) as server:
        api = Api(server.base_url, "tml-expiry-key-0001")
        session_id = api.session()
        model_id = api.model(session_id)
        assert api.post("/session_heartbeat", json={"session_id": session_id}).status_code == 200
        saved = api.post("/save_weights", json={"model_id": model_id, "path": "kept", "seq_id": 1}).json()
        path = api.result(saved["request_id"]).json()["path"]
        assert api.post("/session_heartbeat", json={"session_id": session_id}).status_code == 200
        assert model_id in server.runtime.engine.adapter_ids()
        deadline = time.monotonic() + 15
        while model_id in server.runtime.engine.adapter_ids():  # no heartbeats are sent
            assert time.monotonic() < deadline, "the session never expired"
            time.sleep(0.2)
        heartbeat = api.post("/session_heartbeat", json={"session_id": session_id})
        assert heartbeat.status_code == 410  # the SDK's signal that the session is over
        # its checkpoint stays and still loads into a new session
        assert [c["tinker_path"] for c in api.http.get(f"/training_runs/{model_id}/checkpoints").json()["checkpoints"]] \
            == [path]
        load = api.post("/load_weights", json={"session_id": api.session(), "model_seq_id": 0, "path": path,
                                               "optimizer": True}).json()
        assert "model_id" in api.result(load["request_id"]).json()
