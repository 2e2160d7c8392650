"""Every route, called by one tenant with another tenant's ids and paths, answers 404 with a detail.

The table below has a case for every route of the app that takes a tenant-owned id or path (in the
URL or the body); routes that take none are listed with the reason. A route added to the app without
an entry in either table fails `test_every_route_is_covered`, so ownership is decided, not forgotten.
"""

from __future__ import annotations

import base64
import json
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tinkex.server.app import create_app
from tinkex.server.runtime import ServerSettings

from ..conftest import BOB
from .test_protocol import MODEL, PROTO, Api, datum, fb_body

# Routes that take no tenant-owned id or path, and why that is safe.
NO_OWNED_IDS = {
    ("POST", "/api/v1/client/config"): "server configuration, the same for everyone",
    ("POST", "/api/v1/client/dynamic_config"): "server configuration, the same for everyone",
    ("GET", "/api/v1/healthz"): "liveness, no data",
    ("GET", "/api/v1/get_server_capabilities"): "the base models served, the same for everyone",
    ("POST", "/api/v1/create_session"): "creates a session of the caller's own",
    ("POST", "/api/v1/telemetry"): "accepted and dropped",
    ("POST", "/api/v1/checkpoints/import"): "creates a checkpoint of the caller's own from uploaded files",
    ("GET", "/api/v1/dashboard/whoami"): "the caller's own tenant name",
    ("GET", "/api/v1/downloads/{token}"): "a signed, expiring capability link (for curl and browsers, no key): only "
                                          "the owner can mint one (archive / external_weights_urls 404 for others) "
                                          "and a tampered token is refused (test_download_links_cannot_be_forged)",
    ("GET", "/dashboard"): "a static page that carries no data",
    ("GET", "/dashboard/"): "a redirect to the static page",
    ("GET", "/dashboard/static/{name:path}"): "static files of the page (escapes are tested in the dashboard tests)",
    ("GET", "/openapi.json"): "the API schema",
    ("GET", "/docs"): "the API docs page",
    ("GET", "/docs/oauth2-redirect"): "the API docs page",
    ("GET", "/redoc"): "the API docs page",
}
# Routes that list the caller's own things: they take no id, and must not show the other tenant's.
LISTS = {
    ("GET", "/api/v1/checkpoints"): "/api/v1/checkpoints",
    ("GET", "/api/v1/training_runs"): "/api/v1/training_runs",
    ("GET", "/api/v1/sessions"): "/api/v1/sessions",
    ("GET", "/api/v1/dashboard/runs"): "/api/v1/dashboard/runs",
    ("GET", "/api/v1/dashboard/sessions"): "/api/v1/dashboard/sessions",
    ("GET", "/v1/models"): "/v1/models",
    ("GET", "/metrics"): "/metrics",  # counts by route template only: no ids at all
}


@dataclass
class Owned:
    """Alice's things, and a model and session of Bob's own to aim at them from."""

    session: str
    model: str
    sampler: str
    request_id: str
    training: str  # tinker://.../weights/mine
    sampler_checkpoint: str  # tinker://.../sampler_weights/mine-s
    external: str  # tinker://.../external_weights/ext
    bob_session: str
    bob_model: str


def _sample(**target) -> dict:
    return {**target, "seq_id": 0, "num_samples": 1, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
            "sampling_params": {"max_tokens": 2}}


Call = Callable[[httpx.Client, Owned], httpx.Response]
R = "/api/v1/training_runs"
# (method, route) -> the calls that aim Bob at Alice's things through that route
CASES: dict[tuple[str, str], list[Call]] = {
    ("POST", "/api/v1/asample"): [
        lambda c, o: c.post("/api/v1/asample", json=_sample(sampling_session_id=o.sampler)),
        lambda c, o: c.post("/api/v1/asample", json=_sample(model_path=o.sampler_checkpoint))],
    ("POST", "/api/v1/create_model"): [
        lambda c, o: c.post("/api/v1/create_model", json={"session_id": o.session, "model_seq_id": 7,
                                                          "base_model": MODEL, "lora_config": {"rank": 4}})],
    ("POST", "/api/v1/create_sampling_session"): [
        lambda c, o: c.post("/api/v1/create_sampling_session", json={"session_id": o.session,
                                                                     "sampling_session_seq_id": 9, "base_model": MODEL}),
        lambda c, o: c.post("/api/v1/create_sampling_session", json={
            "session_id": o.bob_session, "sampling_session_seq_id": 9, "model_path": o.sampler_checkpoint})],
    ("POST", "/api/v1/dashboard/tokenize"): [
        lambda c, o: c.post("/api/v1/dashboard/tokenize", json={"text": "hi", "model_path": o.training})],
    ("POST", "/api/v1/dashboard/detokenize"): [
        lambda c, o: c.post("/api/v1/dashboard/detokenize", json={"tokens": [1], "model_path": o.sampler_checkpoint})],
    ("GET", "/api/v1/dashboard/runs/{run_id}"): [lambda c, o: c.get(f"/api/v1/dashboard/runs/{o.model}")],
    ("POST", "/api/v1/forward"): [
        lambda c, o: c.post("/api/v1/forward", json={"model_id": o.model, "seq_id": 20, "forward_input": {
            "data": [datum([1, 2, 3]).model_dump(mode="json")], "loss_fn": "cross_entropy"}})],
    ("POST", "/api/v1/forward_backward"): [
        lambda c, o: c.post("/api/v1/forward_backward", content=fb_body(o.model, 20, [datum([1, 2, 3])]),
                            headers=PROTO)],
    ("POST", "/api/v1/get_info"): [lambda c, o: c.post("/api/v1/get_info", json={"model_id": o.model})],
    ("POST", "/api/v1/load_weights"): [
        lambda c, o: c.post("/api/v1/load_weights", json={"model_id": o.model, "path": o.training, "seq_id": 20}),
        lambda c, o: c.post("/api/v1/load_weights", json={"model_id": o.bob_model, "path": o.training,
                                                          "seq_id": 1}),
        lambda c, o: c.post("/api/v1/load_weights", json={"session_id": o.bob_session, "model_seq_id": 5,
                                                          "path": o.training})],
    ("POST", "/api/v1/optim_step"): [
        lambda c, o: c.post("/api/v1/optim_step", json={"model_id": o.model, "seq_id": 20, "adam_params": {}})],
    ("POST", "/api/v1/retrieve_future"): [
        lambda c, o: c.post("/api/v1/retrieve_future", json={"request_id": o.request_id})],
    ("GET", "/api/v1/samplers/{sampler_id}"): [lambda c, o: c.get(f"/api/v1/samplers/{o.sampler}")],
    ("POST", "/api/v1/save_weights"): [
        lambda c, o: c.post("/api/v1/save_weights", json={"model_id": o.model, "path": "mine", "seq_id": 1}),
        lambda c, o: c.post("/api/v1/save_weights", json={"model_id": o.model, "path": "theirs", "seq_id": 20})],
    ("POST", "/api/v1/save_weights_external"): [
        lambda c, o: c.post("/api/v1/save_weights_external", json={"model_id": o.model, "path": "x", "seq_id": 20})],
    ("POST", "/api/v1/save_weights_for_sampler"): [
        lambda c, o: c.post("/api/v1/save_weights_for_sampler", json={"model_id": o.model, "seq_id": 20,
                                                                      "sampling_session_seq_id": 3})],
    ("POST", "/api/v1/session_heartbeat"): [
        lambda c, o: c.post("/api/v1/session_heartbeat", json={"session_id": o.session})],
    ("GET", "/api/v1/sessions/{session_id}"): [lambda c, o: c.get(f"/api/v1/sessions/{o.session}")],
    ("POST", "/api/v1/sessions/{session_id}/finish"): [
        lambda c, o: c.post(f"/api/v1/sessions/{o.session}/finish", json={"reason": {"type": "success"}})],
    ("GET", "/api/v1/training_runs/{run_id}"): [lambda c, o: c.get(f"{R}/{o.model}")],
    ("GET", "/api/v1/training_runs/{run_id}/checkpoints"): [lambda c, o: c.get(f"{R}/{o.model}/checkpoints")],
    ("GET", "/api/v1/training_runs/{run_id}/metrics"): [lambda c, o: c.get(f"{R}/{o.model}/metrics")],
    ("DELETE", "/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}"): [
        lambda c, o: c.delete(f"{R}/{o.model}/checkpoints/weights/mine"),
        lambda c, o: c.delete(f"{R}/{o.model}/checkpoints/sampler_weights/mine-s/publish")],
    ("GET", "/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/archive"): [
        lambda c, o: c.get(f"{R}/{o.model}/checkpoints/weights/mine/archive", params={"redirect": "false"}),
        lambda c, o: c.get(f"{R}/{o.model}/checkpoints/weights/mine/archive")],
    ("GET", "/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls"): [
        lambda c, o: c.get(f"{R}/{o.model}/checkpoints/external_weights/ext/external_weights_urls")],
    ("POST", "/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish"): [
        lambda c, o: c.post(f"{R}/{o.model}/checkpoints/weights/mine/publish")],
    ("PUT", "/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl"): [
        lambda c, o: c.put(f"{R}/{o.model}/checkpoints/weights/mine/ttl", json={"ttl_seconds": 7200})],
    ("POST", "/api/v1/unload_model"): [lambda c, o: c.post("/api/v1/unload_model", json={"model_id": o.model})],
    ("POST", "/api/v1/weights_info"): [
        lambda c, o: c.post("/api/v1/weights_info", json={"tinker_path": o.training}),
        lambda c, o: c.post("/api/v1/weights_info", json={"tinker_path": o.external})],
    ("POST", "/v1/completions"): [
        lambda c, o: c.post("/v1/completions", json={"model": o.sampler_checkpoint, "prompt": "hi", "max_tokens": 2}),
        lambda c, o: c.post("/v1/completions", json={"model": o.training, "prompt": [1, 2], "stream": True})],
    ("POST", "/v1/chat/completions"): [
        lambda c, o: c.post("/v1/chat/completions", json={"model": o.sampler_checkpoint, "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "hi"}]})],
}


def app_routes() -> set[tuple[str, str]]:
    """(method, path) of every route of the app, as a plain `tinkex serve` builds it."""
    class NoEngine:  # listing routes needs no model
        pass

    with tempfile.TemporaryDirectory(prefix="tinkex-routes-") as data_dir:
        app = create_app(ServerSettings(data_dir=Path(data_dir)), engine=NoEngine())
    routes = set()
    for route in app.routes:
        # FastAPI keeps included routers as one entry each; their routes are their effective contexts
        contexts = list(route.effective_route_contexts()) if hasattr(route, "effective_route_contexts") else [route]
        for context in contexts:
            routes |= {(method, context.path) for method in context.methods or () if method != "HEAD"}
    return routes


def test_every_route_is_covered():
    routes = app_routes()
    decided = set(CASES) | set(NO_OWNED_IDS) | set(LISTS)
    assert routes - decided == set(), "routes without an ownership case: add them to CASES, LISTS or NO_OWNED_IDS"
    assert decided - routes == set(), "cases for routes that no longer exist"
    assert len(routes) >= 50


@pytest.fixture(scope="module")
def owned(server) -> Owned:
    alice, bob = Api(server.base_url), Api(server.base_url, BOB)
    session = alice.session()
    model = alice.model(session)

    def done(path: str, body: dict) -> dict:
        return alice.result(alice.post(path, json=body).json()["request_id"]).json()

    training = done("/save_weights", {"model_id": model, "path": "mine", "seq_id": 1})["path"]
    sampler_checkpoint = done("/save_weights_for_sampler", {"model_id": model, "path": "mine-s", "seq_id": 2})["path"]
    external = done("/save_weights_external", {"model_id": model, "path": "ext", "seq_id": 3})["path"]
    sampler = alice.post("/create_sampling_session", json={"session_id": session, "sampling_session_seq_id": 0,
                                                           "model_path": sampler_checkpoint}).json()
    request_id = alice.post("/optim_step", json={"model_id": model, "seq_id": 4, "adam_params": {}}).json()["request_id"]
    alice.result(request_id)
    bob_session = bob.session()
    return Owned(session=session, model=model, sampler=sampler["sampling_session_id"], request_id=request_id,
                 training=training, sampler_checkpoint=sampler_checkpoint, external=external,
                 bob_session=bob_session, bob_model=bob.model(bob_session))


def test_another_tenants_ids_get_404_on_every_route(server, owned):
    bob = httpx.Client(base_url=server.base_url, headers={"X-API-Key": BOB}, timeout=60)
    assert set(CASES) <= app_routes()
    for route, calls in CASES.items():
        for number, call in enumerate(calls):
            answer = call(bob, owned)
            assert answer.status_code == 404, (route, number, answer.status_code, answer.text[:300])
            assert answer.json()["detail"], (route, number)
    # and none of it touched alice's things
    alice = Api(server.base_url)
    assert alice.post("/session_heartbeat", json={"session_id": owned.session}).status_code == 200
    listed = alice.http.get(f"/training_runs/{owned.model}/checkpoints").json()["checkpoints"]
    assert {c["tinker_path"] for c in listed} == {owned.training, owned.sampler_checkpoint, owned.external}
    assert not any(c["public"] for c in listed) and all(c["expires_at"] is None for c in listed)
    assert "loss:sum" in alice.result(alice.post("/forward_backward", content=fb_body(owned.model, 5, [datum([1, 2, 3])]),
                                                 headers=PROTO).json()["request_id"]).json()["metrics"]


def test_lists_show_only_the_callers_own(server, owned):
    bob = httpx.Client(base_url=server.base_url, headers={"X-API-Key": BOB}, timeout=60)
    for route, path in LISTS.items():
        answer = bob.get(path)
        assert answer.status_code == 200, route
        for alices in (owned.session, owned.model, owned.sampler, owned.training, owned.sampler_checkpoint,
                       owned.external, owned.request_id):
            assert alices not in answer.text, (route, alices)
    assert owned.bob_model in bob.get("/api/v1/training_runs").text  # the lists do list bob's own


def test_download_links_cannot_be_forged(server, owned):
    alice = Api(server.base_url)
    url = alice.http.get(f"/training_runs/{owned.model}/checkpoints/weights/mine/archive",
                         params={"redirect": "false"}).json()["url"]
    assert httpx.get(url).status_code == 200  # the owner's link works without a key
    token = url.rsplit("/", 1)[1]
    payload, mac = token.rsplit(".", 1)
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    for forged_claims in ({**claims, "path": owned.external}, {**claims, "file": "../../download_secret"},
                          {**claims, "exp": claims["exp"] + 10**6}):
        forged = base64.urlsafe_b64encode(json.dumps(forged_claims).encode()).decode().rstrip("=")
        answer = httpx.get(f"{server.base_url}/api/v1/downloads/{forged}.{mac}")
        assert answer.status_code == 403 and answer.json()["detail"] == "invalid download link"


ESCAPES = ["../escaped", "../../escaped", "/tmp/escaped", "..", ".", "a/../../escaped", "..%2Fescaped",
           "%2e%2e%2fescaped", "..\\escaped", "escaped/..", "~/escaped", "escaped\x00", " escaped", ".escaped",
           "x" * 200]


@pytest.mark.parametrize("name", ESCAPES)
def test_checkpoint_names_cannot_escape_their_directory(server, owned, name):
    alice = Api(server.base_url)
    for path, extra in (("/save_weights", {}), ("/save_weights_for_sampler", {}), ("/save_weights_external", {})):
        answer = alice.post(path, json={"model_id": owned.model, "path": name, **extra})
        assert answer.status_code == 400, (path, name, answer.text)
        assert "checkpoint name" in answer.json()["detail"]
    upload = alice.post("/checkpoints/import", data={"name": name, "base_model": MODEL},
                        files={"config": ("adapter_config.json", b"{}"), "weights": ("w.safetensors", b"")})
    assert upload.status_code == 400 and "checkpoint name" in upload.json()["detail"], upload.text
    # addressed REST-style or as tinker:// paths, such names find nothing (or another route: httpx resolves "..")
    quoted = urllib.parse.quote(name, safe="/%")
    assert 400 <= alice.http.get(f"/training_runs/{owned.model}/checkpoints/weights/{quoted}/archive").status_code < 500
    info = alice.post("/weights_info", json={"tinker_path": f"tinker://{owned.model}/weights/{name}"})
    assert info.status_code in (400, 404) and info.json()["detail"]
    # and nothing named "escaped" was written, inside the data directory or beside it
    assert not [*server.data_dir.rglob("*escaped*"), *server.data_dir.parent.glob("*escaped*")]
