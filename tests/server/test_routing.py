"""The per-step routes, called directly by LeanRoute (routing.py), answer as FastAPI's handler does:
the key before the body, a bad body 400 with a detail, the result as its response model's JSON."""

from __future__ import annotations

import httpx
import pytest
from fastapi.routing import APIRoute

from tinkex.server.routers import futures, sampling, training
from tinkex.server.routing import _direct_handler
from tinkex.types import OptimStepRequest, UntypedAPIFuture

from ..conftest import ALICE
from .test_protocol import Api

DIRECT = {"/api/v1/retrieve_future", "/api/v1/asample", "/api/v1/forward_backward", "/api/v1/forward",
          "/api/v1/optim_step"}
# A valid body for each (ids that do not exist: these requests get as far as the lookup).
BODIES = {
    "/api/v1/retrieve_future": {"request_id": "nope"},
    "/api/v1/asample": {"sampling_session_id": "nope", "seq_id": 0, "num_samples": 1,
                        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                        "sampling_params": {"max_tokens": 2}},
    "/api/v1/forward": {"model_id": "nope", "seq_id": 0,
                        "forward_input": {"data": [], "loss_fn": "cross_entropy"}},
    "/api/v1/optim_step": {"model_id": "nope", "seq_id": 0, "adam_params": {"learning_rate": 1e-4}},
}


def test_the_per_step_routes_are_called_directly():
    """Exactly the async routes with plain signatures skip FastAPI's handler; the others keep it."""
    routes = [r for router in (futures.router, sampling.router, training.router) for r in router.routes
              if isinstance(r, APIRoute)]
    assert {r.path for r in routes if _direct_handler(r) is not None} == DIRECT
    assert _direct_handler(next(r for r in routes if r.path == "/api/v1/create_model")) is None  # a plain def


@pytest.mark.parametrize("path", sorted(BODIES))
def test_direct_routes_check_the_key_then_the_body(server, path):
    url = server.base_url + path
    without_key = httpx.post(url, content=b"{not json")
    assert without_key.status_code == 401 and "API key" in without_key.json()["detail"]
    assert without_key.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    key = {"X-API-Key": ALICE}
    broken = httpx.post(url, content=b"{not json", headers=key)
    assert broken.status_code == 400 and broken.json()["detail"].startswith("invalid request: ")
    missing = dict(BODIES[path])
    field = next(iter(missing))
    del missing[field]
    answer = httpx.post(url, json=missing, headers=key)
    assert answer.status_code == 400 and field in answer.json()["detail"], answer.text
    wrong_type = {**BODIES[path], field: {"a": "dict"}}
    assert httpx.post(url, json=wrong_type, headers=key).status_code == 400
    unknown = httpx.post(url, json=BODIES[path], headers=key)  # well formed, for nothing of Alice's
    assert unknown.status_code == 404 and "not found" in unknown.json()["detail"]


def test_a_direct_route_answers_its_response_model(server):
    api = Api(server.base_url)
    model_id = api.model(api.session())
    body = OptimStepRequest(model_id=model_id, seq_id=1, adam_params={"learning_rate": 1e-4})
    response = api.post("/optim_step", content=body.model_dump_json(), headers={"Content-Type": "application/json"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    future = UntypedAPIFuture.model_validate_json(response.content)
    assert response.json() == future.model_dump(mode="json", by_alias=True)  # every field, none left out
    assert future.model_id == model_id
    assert "metrics" in api.result(future.request_id).json()
