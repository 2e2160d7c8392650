"""retrieve_future: the long-poll that hands clients their results."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tinkex.types import (
    FutureRetrieveRequest,
    RequestFailedResponse,
    TryAgainResponse,
    encode_forward_backward_output,
    encode_sample_response,
)

from ..deps import RuntimeDep, TenantDep
from ..routing import LeanRoute
from ..runtime import not_found

router = APIRouter(prefix="/api/v1", route_class=LeanRoute)  # the per-step routes: see routing.py
PROTOBUF = "application/x-protobuf"


@router.post("/retrieve_future")
async def retrieve_future(body: FutureRetrieveRequest, request: Request, runtime: RuntimeDep,
                          tenant: TenantDep) -> Response:
    future = runtime.futures.lookup(body.request_id, tenant)
    if future is None:
        raise not_found(f"request {body.request_id!r}")
    if future == "lost":
        return JSONResponse(status_code=410, content={
            "detail": f"request {body.request_id!r} was in flight when the server restarted; submit it again"})
    if not await runtime.futures.wait(future, runtime.settings.long_poll_seconds):
        return JSONResponse(TryAgainResponse(request_id=body.request_id).to_json_dict())
    outcome = future.outcome
    if outcome.error is not None:
        failed = RequestFailedResponse(error=outcome.error, category=outcome.category)  # type: ignore[arg-type]
        return JSONResponse(failed.to_json_dict())
    # SDKs since 0.25 ask for protobuf for these two results; older ones take JSON.
    if outcome.kind != "json" and PROTOBUF in request.headers.get("accept", ""):
        encode = encode_forward_backward_output if outcome.kind == "forward_backward" else encode_sample_response
        return Response(content=encode(outcome.result), media_type=PROTOBUF)
    return JSONResponse(outcome.result.model_dump(mode="json", exclude_none=True))
