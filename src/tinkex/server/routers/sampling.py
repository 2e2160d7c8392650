"""Sampling: sampling sessions and asample."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from tinkex.engine.api import SampleJob
from tinkex.types import (
    CreateSamplingSessionRequest,
    CreateSamplingSessionResponse,
    SampleRequest,
    UntypedAPIFuture,
)

from .. import convert
from ..deps import RuntimeDep, TenantDep
from ..routing import LeanRoute
from ..futures import Future, Outcome
from ..runtime import Runtime, bad_request
from ..scheduler import Work
from ..store import SamplingSessionRow

router = APIRouter(prefix="/api/v1", route_class=LeanRoute)  # the per-step routes: see routing.py


@router.post("/create_sampling_session")
def create_sampling_session(body: CreateSamplingSessionRequest, runtime: RuntimeDep,
                            tenant: TenantDep) -> CreateSamplingSessionResponse:
    runtime.active_session(body.session_id, tenant)
    sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
    existing = runtime.store.owned(SamplingSessionRow, sampler_id, tenant)
    if existing is not None:  # a retried create
        return CreateSamplingSessionResponse(sampling_session_id=sampler_id)
    if body.model_path is not None:
        base_model = runtime.checkpoint_base_model(body.model_path, tenant)
    elif body.base_model is not None:
        base_model = runtime.model_info(body.base_model).name
    else:
        raise bad_request("create_sampling_session needs model_path or base_model")
    runtime.store.add(SamplingSessionRow(id=sampler_id, tenant=tenant, session_id=body.session_id,
                                         base_model=base_model, model_path=body.model_path))
    return CreateSamplingSessionResponse(sampling_session_id=sampler_id)


@router.post("/asample")
async def asample(body: SampleRequest, runtime: RuntimeDep, tenant: TenantDep) -> UntypedAPIFuture:
    # A coroutine, like the per-step training routes: a sampling session's request is answered from
    # memory and one request row (the legacy addressing below reads a checkpoint row as well).
    if body.sampling_session_id is not None:
        key = (body.sampling_session_id, body.seq_id) if body.seq_id is not None else None
        sampler = runtime.sampler(body.sampling_session_id, tenant)
        if key is not None and (existing := runtime.scheduler.existing_sample(key)) is not None:
            return UntypedAPIFuture(request_id=existing, sample_sequence_ids=_sequence_ids(key, body.num_samples))
        base_model, adapter = sampler.base_model, runtime.sampler_adapter(sampler)
    elif body.model_path is not None:  # legacy addressing of SDKs without sampling sessions
        key = None
        base_model = runtime.checkpoint_base_model(body.model_path, tenant)
        adapter = runtime.register_sampler_weights(runtime.checkpoint(body.model_path, tenant).directory)
    elif body.base_model is not None:
        key, base_model, adapter = None, body.base_model, None
    else:
        raise bad_request("asample needs sampling_session_id (or model_path / base_model)")
    info = runtime.model_info(base_model)
    try:
        job = convert.sample_job(body, info, adapter)
    except convert.InputError as exc:
        raise bad_request(str(exc)) from None
    future = queue_sample(runtime, tenant, job, body, key)
    await runtime.futures.stored(future.request_id)  # the id goes out once its row is committed
    ids_key = key or (uuid.uuid4().hex, 0)
    return UntypedAPIFuture(request_id=future.request_id, sample_sequence_ids=_sequence_ids(ids_key, body.num_samples))


def queue_sample(runtime: Runtime, tenant: str, job: SampleJob, request: SampleRequest,
                 key: tuple[str, int] | None = None) -> Future:
    """Record a sample request's future and hand the job to the scheduler; its result is answered as
    `request` asked. A full queue raises QueueFull (429) before anything is recorded, so the client
    resubmits the same request (and seq_id) later."""
    with runtime.scheduler.room():
        future = runtime.futures.create(tenant, "Sample")
        runtime.scheduler.submit_sample(key, Work(future=future, sample=job, finish=lambda result: Outcome(
            result=convert.sample_response(result, request))))
    return future


def _sequence_ids(key: tuple[str, int], num_samples: int) -> list[str]:
    return [f"{key[0]}:{key[1]}:{i}" for i in range(num_samples)]
