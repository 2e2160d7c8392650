"""REST resources: training runs, checkpoints, weights info, sessions and samplers."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from tinkex.types import (
    Checkpoint,
    CheckpointsListResponse,
    CheckpointTtlRequest,
    Cursor,
    GetSamplerResponse,
    GetSessionResponse,
    ListSessionsResponse,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoRequest,
    WeightsInfoResponse,
)
from tinkex.types._rest import SEGMENTS

from ..deps import RuntimeDep, TenantDep
from ..runtime import Runtime, bad_request, not_found
from sqlalchemy import select

from ..store import CheckpointRow, MetricRow, SamplingSessionRow, SessionRow, TrainingRunRow, utcnow

router = APIRouter(prefix="/api/v1")
Limit = Annotated[int, Query(ge=0, le=10_000)]
Offset = Annotated[int, Query(ge=0, le=2**31)]
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
_FINAL = {"x-should-retry": "false"}  # SDKs retry 409s unless told this one is final


def _checkpoint(row: CheckpointRow) -> Checkpoint:
    return Checkpoint(checkpoint_id=f"{SEGMENTS[row.checkpoint_type]}/{row.name}",
                      checkpoint_type=row.checkpoint_type, time=row.created_at, tinker_path=row.tinker_path,
                      size_bytes=row.size_bytes, public=row.public, user_metadata=row.user_metadata,
                      expires_at=row.expires_at)


def _latest(runtime: Runtime, run_id: str, tenant: str, kind: str) -> Checkpoint | None:
    rows, _ = runtime.store.list(CheckpointRow, tenant, order_by=CheckpointRow.created_at.desc(), limit=1,
                                 training_run_id=run_id, checkpoint_type=kind)
    return _checkpoint(rows[0]) if rows else None


def _training_run(runtime: Runtime, row: TrainingRunRow) -> TrainingRun:
    return TrainingRun(
        training_run_id=row.id, base_model=row.base_model, model_owner=row.tenant, is_lora=True,
        corrupted=row.corrupted, lora_rank=row.lora_rank, last_request_time=row.last_request_time,
        last_checkpoint=_latest(runtime, row.id, row.tenant, "training"),
        last_sampler_checkpoint=_latest(runtime, row.id, row.tenant, "sampler"),
        user_metadata=row.user_metadata)


@router.get("/training_runs")
def list_training_runs(runtime: RuntimeDep, tenant: TenantDep, limit: Limit = 20, offset: Offset = 0) -> TrainingRunsResponse:
    rows, total = runtime.store.list(TrainingRunRow, tenant, order_by=TrainingRunRow.created_at.desc(),
                                     limit=limit or None, offset=offset)
    return TrainingRunsResponse(training_runs=[_training_run(runtime, row) for row in rows],
                                cursor=Cursor(offset=offset, limit=limit, total_count=total))


@router.get("/training_runs/{run_id}")
def get_training_run(run_id: str, runtime: RuntimeDep, tenant: TenantDep) -> TrainingRun:
    return _training_run(runtime, runtime.training_run(run_id, tenant))


@router.get("/training_runs/{run_id}/metrics")
def run_metrics(run_id: str, runtime: RuntimeDep, tenant: TenantDep, after_seq_id: int = -1) -> dict:
    """The metrics each forward_backward and optim_step returned, in order (a tinkex addition)."""
    runtime.training_run(run_id, tenant)
    with runtime.store.session() as session:
        rows = session.scalars(select(MetricRow).where(MetricRow.training_run_id == run_id,
                                                       MetricRow.seq_id > after_seq_id).order_by(MetricRow.seq_id))
        return {"metrics": [{"seq_id": r.seq_id, "request_type": r.request_type, "metrics": r.metrics,
                             "time": r.created_at.isoformat()} for r in rows]}


@router.get("/training_runs/{run_id}/checkpoints")
def list_run_checkpoints(run_id: str, runtime: RuntimeDep, tenant: TenantDep) -> CheckpointsListResponse:
    runtime.training_run(run_id, tenant)
    rows, total = runtime.store.list(CheckpointRow, tenant, order_by=CheckpointRow.created_at,
                                     training_run_id=run_id)
    return CheckpointsListResponse(checkpoints=[_checkpoint(row) for row in rows],
                                   cursor=Cursor(offset=0, limit=total, total_count=total))


@router.get("/checkpoints")
def list_user_checkpoints(runtime: RuntimeDep, tenant: TenantDep, limit: Limit = 100,
                          offset: Offset = 0) -> CheckpointsListResponse:
    rows, total = runtime.store.list(CheckpointRow, tenant, order_by=CheckpointRow.created_at.desc(),
                                     limit=limit or None, offset=offset)
    return CheckpointsListResponse(checkpoints=[_checkpoint(row) for row in rows],
                                   cursor=Cursor(offset=offset, limit=limit, total_count=total))


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
def delete_checkpoint(run_id: str, checkpoint_id: str, runtime: RuntimeDep, tenant: TenantDep) -> dict:
    # One route serves DELETE .../{segment}/{name} and DELETE .../{segment}/{name}/publish (unpublish).
    if checkpoint_id.count("/") == 2 and checkpoint_id.endswith("/publish"):
        return unpublish_checkpoint(run_id, checkpoint_id[: -len("/publish")], runtime, tenant)
    runtime.delete_checkpoint(runtime.owned_checkpoint(run_id, checkpoint_id, tenant))
    return {}


@router.post("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish")
def publish_checkpoint(run_id: str, checkpoint_id: str, runtime: RuntimeDep, tenant: TenantDep) -> dict:
    row = runtime.owned_checkpoint(run_id, checkpoint_id, tenant)
    if row.public:
        raise HTTPException(status_code=409, detail=f"{row.tinker_path} is already public", headers=_FINAL)
    runtime.store.update(CheckpointRow, row.tinker_path, public=True)
    return {}


def unpublish_checkpoint(run_id: str, checkpoint_id: str, runtime: Runtime, tenant: str) -> dict:
    row = runtime.owned_checkpoint(run_id, checkpoint_id, tenant)
    if not row.public:
        raise HTTPException(status_code=409, detail=f"{row.tinker_path} is not public", headers=_FINAL)
    runtime.store.update(CheckpointRow, row.tinker_path, public=False)
    return {}


@router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl")
def set_checkpoint_ttl(run_id: str, checkpoint_id: str, body: CheckpointTtlRequest, runtime: RuntimeDep,
                       tenant: TenantDep) -> dict:
    row = runtime.owned_checkpoint(run_id, checkpoint_id, tenant)
    if body.ttl_seconds is not None and not 3600 <= body.ttl_seconds <= MAX_TTL_SECONDS:
        raise bad_request("ttl_seconds must be between 3600 (an hour) and ten years, or null for no expiry")
    expires = utcnow() + timedelta(seconds=body.ttl_seconds) if body.ttl_seconds else None
    runtime.store.update(CheckpointRow, row.tinker_path, expires_at=expires)
    return {}


@router.post("/weights_info")
def weights_info(body: WeightsInfoRequest, runtime: RuntimeDep, tenant: TenantDep) -> WeightsInfoResponse:
    checkpoint = runtime.checkpoint(body.tinker_path, tenant)
    run = runtime.store.get(TrainingRunRow, checkpoint.training_run_id)
    if run is None:
        raise not_found(f"training run {checkpoint.training_run_id!r}")
    return WeightsInfoResponse(base_model=run.base_model, is_lora=True, lora_rank=run.lora_rank,
                               train_unembed=run.train_unembed, train_mlp=run.train_mlp, train_attn=run.train_attn)


@router.get("/sessions")
def list_sessions(runtime: RuntimeDep, tenant: TenantDep, limit: Limit = 20, offset: Offset = 0) -> ListSessionsResponse:
    rows, _ = runtime.store.list(SessionRow, tenant, order_by=SessionRow.created_at.desc(), limit=limit or None,
                                 offset=offset)
    return ListSessionsResponse(sessions=[row.id for row in rows])


@router.get("/sessions/{session_id}")
def get_session(session_id: str, runtime: RuntimeDep, tenant: TenantDep) -> GetSessionResponse:
    row = runtime.store.owned(SessionRow, session_id, tenant)
    if row is None:
        raise not_found(f"session {session_id!r}")
    runs, _ = runtime.store.list(TrainingRunRow, tenant, order_by=TrainingRunRow.created_at, session_id=session_id)
    samplers, _ = runtime.store.list(SamplingSessionRow, tenant, order_by=SamplingSessionRow.created_at,
                                     session_id=session_id)
    return GetSessionResponse(training_run_ids=[r.id for r in runs], sampler_ids=[s.id for s in samplers],
                              user_metadata=row.user_metadata, display_name=row.display_name)


@router.get("/samplers/{sampler_id}")
def get_sampler(sampler_id: str, runtime: RuntimeDep, tenant: TenantDep) -> GetSamplerResponse:
    row = runtime.store.owned(SamplingSessionRow, sampler_id, tenant)
    if row is None:
        raise not_found(f"sampler {sampler_id!r}")
    model_path = row.model_path if row.model_path and row.model_path.startswith("tinker://") else None
    return GetSamplerResponse(sampler_id=row.id, base_model=row.base_model, model_path=model_path)
