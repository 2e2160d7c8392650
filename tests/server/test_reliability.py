"""Crashes, load and limits: kill -9 with requests in flight loses nothing that finished; corrupt
checkpoints fail clearly; a full queue answers 429 that both SDKs ride out; limits are 4xx with a detail."""

from __future__ import annotations

import socket
import sqlite3
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ..conftest import ALICE, start_server
from .test_protocol import MODEL, PROTO, Api, datum, fb_body


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
        # the run that failed to load is not listed; the one the checkpoint came from is
        runs = [run["training_run_id"] for run in api.http.get("/training_runs").json()["training_runs"]]
        assert load["model_id"] not in runs and model_id in runs
        # the server is unharmed
        assert api.model(api.session())
    finally:
        proc.stop()


def test_deleting_a_checkpoint_frees_its_sampler_weights(tmp_path, hf_home):
    from tinkex.server import EmbeddedServer

    with EmbeddedServer(data_dir=tmp_path / "data", api_keys={ALICE: "alice"}) as server:
        api = Api(server.base_url)
        session_id = api.session()
        model_id = api.model(session_id)
        saved = api.post("/save_weights_for_sampler", json={"model_id": model_id, "path": "gone", "seq_id": 1}).json()
        path = api.result(saved["request_id"]).json()["path"]
        sampler = api.post("/create_sampling_session", json={"session_id": session_id, "sampling_session_seq_id": 0,
                                                             "model_path": path}).json()["sampling_session_id"]
        sampled = api.post("/asample", json=_sample_body(sampler, 0, [1, 2, 3])).json()
        assert len(api.result(sampled["request_id"]).json()["sequences"][0]["tokens"]) == 3
        loaded = [a for a in server.runtime.engine.adapter_ids() if a.startswith("sampler:")]
        assert len(loaded) == 1 and loaded[0].endswith("gone")
        assert api.http.delete(f"/training_runs/{model_id}/checkpoints/sampler_weights/gone").status_code == 200
        deadline = time.monotonic() + 10
        while loaded[0] in server.runtime.engine.adapter_ids():
            assert time.monotonic() < deadline, "the deleted checkpoint's sampler weights stayed loaded"
            time.sleep(0.05)
        assert api.post("/asample", json=_sample_body(sampler, 1, [1, 2, 3])).status_code == 404
        assert model_id in server.runtime.engine.adapter_ids()  # the training adapter is untouched


def test_checkpoints_whose_ttl_ran_out_are_deleted(tmp_path, hf_home):
    from datetime import timedelta

    from tinkex.server import EmbeddedServer
    from tinkex.server.store import CheckpointRow, utcnow

    with EmbeddedServer(data_dir=tmp_path / "data", api_keys={ALICE: "alice"}, session_timeout_seconds=2.0) as server:
        api = Api(server.base_url)
        model_id = api.model(api.session())
        paths = {}
        for seq_id, (name, ttl) in enumerate([("short", 3600), ("forever", None)], start=1):
            saved = api.post("/save_weights", json={"model_id": model_id, "path": name, "seq_id": seq_id,
                                                    "ttl_seconds": ttl}).json()
            paths[name] = api.result(saved["request_id"]).json()["path"]
        row = server.runtime.store.get(CheckpointRow, paths["short"])
        assert row.expires_at is not None and server.runtime.store.get(CheckpointRow, paths["forever"]).expires_at is None
        server.runtime.store.update(CheckpointRow, paths["short"], expires_at=utcnow() - timedelta(seconds=1))
        deadline = time.monotonic() + 10
        # The sweeper runs every 0.5 s and forgets the row before it removes the files (a crash between
        # leaves only unreferenced files), so wait for both.
        while server.runtime.store.get(CheckpointRow, paths["short"]) is not None or Path(row.directory).exists():
            assert time.monotonic() < deadline, "the expired checkpoint was never deleted"
            time.sleep(0.1)
        listed = [c["checkpoint_id"] for c in api.http.get(f"/training_runs/{model_id}/checkpoints").json()["checkpoints"]]
        assert listed == ["weights/forever"]


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


# ---- backpressure ------------------------------------------------------------------------------------

def _sample_body(sampler_id: str, seq_id: int, tokens: list[int]) -> dict:
    return {"sampling_session_id": sampler_id, "seq_id": seq_id, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
            "sampling_params": {"max_tokens": 3, "temperature": 0}}


def _recorded_requests(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "tinkex.db") as db:
        return db.execute("SELECT count(*) FROM requests").fetchone()[0]


def test_a_full_queue_answers_429_and_records_nothing(tmp_path, hf_home):
    proc = start_server(tmp_path / "data", "--max-queued-requests", "2")
    try:
        api = Api(proc.base_url)
        session_id = api.session()
        blocked, other = api.model(session_id, 0), api.model(session_id, 1)
        sampler = api.post("/create_sampling_session", json={"session_id": session_id, "sampling_session_seq_id": 0,
                                                             "base_model": MODEL}).json()["sampling_session_id"]
        one = [datum([5, 6, 7, 8])]
        # seq_ids 3 and 4 arrive early: they wait for 1 and 2, and fill the queue (bound 2)
        early = [api.post("/forward_backward", content=fb_body(blocked, seq, one), headers=PROTO).json()
                 for seq in (3, 4)]
        recorded = _recorded_requests(tmp_path / "data")
        gauges = httpx.get(proc.base_url + "/metrics", params={"format": "json"}).json()["gauges"]
        assert gauges["tinkex_server_engine_queue_depth"] == 2  # the two early ones, waiting for their gap
        refused = [api.post("/asample", json=_sample_body(sampler, 0, [1, 2, 3])),
                   api.post("/forward_backward", content=fb_body(other, 1, one), headers=PROTO),
                   api.post("/forward_backward", content=fb_body(blocked, 5, one), headers=PROTO),
                   api.post("/optim_step", json={"model_id": other, "seq_id": 1, "adam_params": {}})]
        openai = [httpx.post(proc.base_url + "/v1/completions", headers={"Authorization": f"Bearer {ALICE}"},
                             json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2, "stream": stream})
                  for stream in (False, True)]
        for answer in refused + openai:
            assert answer.status_code == 429, answer.text
            assert "busy" in answer.json()["detail"] and "limit is 2" in answer.json()["detail"]
            assert int(answer.headers["retry-after"]) >= 1
        assert _recorded_requests(tmp_path / "data") == recorded  # no future, no seq_id used
        # the requests the early ones wait for are admitted over the bound, else the queue could never drain
        fillers = [api.post("/forward_backward", content=fb_body(blocked, seq, one), headers=PROTO) for seq in (1, 2)]
        assert [f.status_code for f in fillers] == [200, 200]
        for future in [*(f.json() for f in fillers), *early]:
            assert "loss:sum" in api.result(future["request_id"]).json()["metrics"]
        # the refused requests are accepted when resubmitted with the same seq_ids, and run in order
        resubmit = [lambda: api.post("/asample", json=_sample_body(sampler, 0, [1, 2, 3])),
                    lambda: api.post("/forward_backward", content=fb_body(other, 1, one), headers=PROTO),
                    lambda: api.post("/forward_backward", content=fb_body(blocked, 5, one), headers=PROTO),
                    lambda: api.post("/optim_step", json={"model_id": other, "seq_id": 2, "adam_params": {}})]
        results = []
        for send in resubmit:  # one at a time: with a bound of 2 the server has room for each
            answer = send()
            assert answer.status_code == 200, answer.text
            results.append(api.result(answer.json()["request_id"]).json())
        assert len(results[0]["sequences"][0]["tokens"]) == 3
        assert all("metrics" in result for result in results[1:])
        history = api.http.get(f"/training_runs/{blocked}/metrics").json()["metrics"]
        assert [m["seq_id"] for m in history] == [1, 2, 3, 4, 5]
        history = api.http.get(f"/training_runs/{other}/metrics").json()["metrics"]
        assert [(m["seq_id"], m["request_type"]) for m in history] == [(1, "ForwardBackward"), (2, "OptimStep")]
        counted = httpx.get(proc.base_url + "/metrics", params={"format": "json"}).json()["counters"]
        assert sum(v for k, v in counted.items() if k.startswith("tinkex_server_requests_total") and
                   'status="429"' in k) == 6
    finally:
        proc.stop()


def _flood(sdk, service, tokens_of) -> tuple[list, list, object]:
    """Submit 12 greedy samples and a 3-step pipelined training run without waiting: their futures."""
    types = sdk.types
    sampler = service.create_sampling_client(base_model=MODEL)
    sampler = sampler.result() if hasattr(sampler, "result") else sampler  # tinkex answers with a future
    params = types.SamplingParams(max_tokens=4, temperature=0.0)
    samples = [sampler.sample(types.ModelInput.from_ints(tokens_of(i)), num_samples=1, sampling_params=params)
               for i in range(12)]
    trainer = service.create_lora_training_client(base_model=MODEL, rank=4, seed=3).result()
    steps = [(trainer.forward_backward(_batch(types), "cross_entropy"),
              trainer.optim_step(types.AdamParams(learning_rate=1e-2))) for _ in range(3)]
    return samples, steps, trainer


def _batch(types) -> list:
    rows = [[3, 14, 15, 92, 65, 35], [8, 9, 79, 32, 38, 46, 26]]
    return [types.Datum(model_input=types.ModelInput.from_ints(row[:-1]),
                        loss_fn_inputs={"target_tokens": np.array(row[1:], dtype=np.int64),
                                        "weights": np.ones(len(row) - 1, dtype=np.float32)}) for row in rows]


def _429s(base_url: str, route: str) -> float:
    counters = httpx.get(base_url + "/metrics", params={"format": "json"}).json()["counters"]
    return sum(v for k, v in counters.items() if f'route="{route}"' in k and 'status="429"' in k)


def test_both_sdks_ride_out_backpressure_and_lose_nothing(tmp_path, hf_home):
    import tinker

    import tinkex

    proc = start_server(tmp_path / "data", "--max-queued-requests", "4")
    try:
        api = Api(proc.base_url)
        blocker = api.model(api.session())
        official = tinker.ServiceClient(base_url=proc.base_url, api_key=ALICE)
        ours = tinkex.ServiceClient(base_url=proc.base_url, api_key=ALICE)
        floods = {}
        for phase, (name, sdk, service) in enumerate([("tinker", tinker, official), ("tinkex", tinkex, ours)]):
            # four early arrivals, waiting for the two seq_ids before them, fill the queue before each flood
            gap = [1 + 6 * phase, 2 + 6 * phase]
            early = [api.post("/forward_backward", content=fb_body(blocker, seq, [datum([5, 6, 7])]), headers=PROTO)
                     for seq in range(gap[1] + 1, gap[1] + 5)]
            assert [e.status_code for e in early] == [200] * 4
            refused = (_429s(proc.base_url, "/api/v1/asample"), _429s(proc.base_url, "/api/v1/forward_backward"))
            floods[name] = _flood(sdk, service, lambda i, base=100 * (phase + 1): [7, base + i, 11])
            deadline = time.monotonic() + 60
            while (_429s(proc.base_url, "/api/v1/asample") < refused[0] + 4
                   or _429s(proc.base_url, "/api/v1/forward_backward") < refused[1] + 1):
                assert time.monotonic() < deadline, f"the {name} flood never met a full queue"
                time.sleep(0.2)
            for seq in gap:  # fill the gap: the queue drains and the SDK's resubmissions get in
                assert api.post("/forward_backward", content=fb_body(blocker, seq, [datum([5, 6, 7])]),
                                headers=PROTO).status_code == 200
            assert all(api.result(e.json()["request_id"]).status_code == 200 for e in early)
            samples, steps, _ = floods[name]
            for future in [*samples, *(f for pair in steps for f in pair)]:  # drained before the next phase
                future.result(timeout=120)

        # every request completed, and correctly: the same answers as a quiet server gives one at a time
        quiet = ours.create_sampling_client(base_model=MODEL).result()
        params = tinkex.types.SamplingParams(max_tokens=4, temperature=0.0)
        reference = ours.create_lora_training_client(base_model=MODEL, rank=4, seed=3).result()
        expected_losses = []
        for _ in range(3):
            expected_losses.append(reference.forward_backward(_batch(tinkex.types), "cross_entropy")
                                   .result().metrics["loss:sum"])
            reference.optim_step(tinkex.types.AdamParams(learning_rate=1e-2)).result()
        for name, (samples, steps, trainer) in floods.items():
            base = 100 if name == "tinker" else 200
            for i, sample in enumerate(samples):
                want = quiet.sample(tinkex.types.ModelInput.from_ints([7, base + i, 11]), num_samples=1,
                                    sampling_params=params).result()
                assert sample.result(timeout=120).sequences[0].tokens == want.sequences[0].tokens, (name, i)
            losses = [fb.result().metrics["loss:sum"] for fb, _ in steps]
            assert all(step.result() is not None for _, step in steps)
            assert losses == pytest.approx(expected_losses, rel=1e-4), name
            history = api.http.get(f"/training_runs/{trainer.model_id}/metrics").json()["metrics"]
            assert [m["request_type"] for m in history] == ["ForwardBackward", "OptimStep"] * 3, name
            assert [m["seq_id"] for m in history] == sorted(m["seq_id"] for m in history)
        official.close("success")
        ours.close()
    finally:
        proc.stop()


def test_nul_characters_in_ids_are_bad_input_on_every_store(server):
    # PostgreSQL text cannot hold NUL: such ids must be a 4xx with a detail, never a 500 or a dropped connection
    api = Api(server.base_url)
    answers = [api.post("/session_heartbeat", json={"session_id": "a\x00b"}),
               api.post("/get_info", json={"model_id": "m\x00"}),
               api.post("/retrieve_future", json={"request_id": "r\x00"}),
               api.post("/weights_info", json={"tinker_path": "tinker://run\x00/weights/x"}),
               api.http.get("/sessions/a%00b"),
               api.http.get("/training_runs/run%00/checkpoints/weights/x%00/archive")]
    for answer in answers:
        assert 400 <= answer.status_code < 500 and answer.json()["detail"], (answer.request.url, answer.text)


def test_limits_answer_4xx_with_a_detail_over_http(server):
    api = Api(server.base_url)
    model_id = api.model(api.session())
    sampler = api.post("/create_sampling_session", json={"session_id": api.session(), "sampling_session_seq_id": 0,
                                                         "base_model": MODEL}).json()["sampling_session_id"]
    # a body larger than the limit is refused from its Content-Length, before it is read
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /api/v1/forward_backward HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {ALICE}\r\n"
                     f"Content-Type: application/x-protobuf\r\nContent-Length: {2**40}\r\n\r\n".encode())
        answer = b""
        while b"exceeds the limit" not in answer and (chunk := sock.recv(65536)):  # head and body may come apart
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"exceeds the limit" in answer, answer
    context = api.post("/forward_backward", content=fb_body(model_id, 1, [datum([1] * 50_000)]), headers=PROTO)
    samples = api.post("/asample", json={**_sample_body(sampler, 0, [1, 2]), "num_samples": 10_000})
    vocabulary = api.post("/asample", json=_sample_body(sampler, 1, [1, 10**9]))
    rate = api.post("/optim_step", json={"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 1e6}})
    for answer, words in ((context, "context"), (samples, "num_samples"), (vocabulary, "vocabulary"),
                          (rate, "learning_rate")):
        assert answer.status_code == 400 and words in answer.json()["detail"], answer.text
