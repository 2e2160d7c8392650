"""The web dashboard: its pages at /dashboard and the few JSON views they need that the REST API lacks.

The pages are static files (plain HTML, CSS and ES modules, plus a vendored Chart.js) that ask for
everything with the user's API key in the X-API-Key header, so every JSON route here is scoped to the
caller's tenant by the same dependency as the rest of the API. The pages themselves carry no data and
need no key.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from ..deps import RuntimeDep, TenantDep
from ..runtime import Runtime, bad_request
from ..store import MetricRow, SamplingSessionRow, SessionRow, TrainingRunRow, utcnow

router = APIRouter()
STATIC = Path(__file__).resolve().parent.parent / "static" / "dashboard"
Limit = Annotated[int, Query(ge=1, le=1000)]
LIVE_SECONDS = 30.0  # a session is live while its heartbeat (every 10 s from the SDKs) is this fresh
ACTIVE_SECONDS = 60.0  # a run is "training" while it had a request this recently
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
}
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".txt": "text/plain; charset=utf-8"}


# ---- pages ------------------------------------------------------------------------------------------

@router.get("/dashboard", include_in_schema=False)
def dashboard_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type=_TYPES[".html"], headers=_HEADERS)


@router.get("/dashboard/", include_in_schema=False)
def dashboard_slash() -> RedirectResponse:
    return RedirectResponse("/dashboard", status_code=308)


@router.get("/dashboard/static/{name:path}", include_in_schema=False)
def dashboard_asset(name: str) -> FileResponse:
    path = (STATIC / name).resolve()
    if STATIC not in path.parents or not path.is_file() or path.suffix not in _TYPES:
        raise HTTPException(status_code=404, detail=f"no dashboard file {name!r}")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=_HEADERS)


# ---- JSON views -------------------------------------------------------------------------------------

def _utc(value: datetime | None) -> datetime | None:
    if isinstance(value, str):  # some drivers hand aggregate datetimes back as text
        value = datetime.fromisoformat(value)
    if value is not None and value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def _iso(value: datetime | None) -> str | None:
    value = _utc(value)
    return value.isoformat() if value is not None else None


@router.get("/api/v1/dashboard/whoami")
def dashboard_whoami(tenant: TenantDep) -> dict:
    """The tenant the caller's key belongs to (the sign-in form checks the key with it)."""
    return {"tenant": tenant}


@router.get("/api/v1/dashboard/sessions")
def dashboard_sessions(runtime: RuntimeDep, tenant: TenantDep, limit: Limit = 100) -> dict:
    """The tenant's most recent sessions with their heartbeat age (seconds, by the server's clock)."""
    rows, total = runtime.store.list(SessionRow, tenant, order_by=SessionRow.created_at.desc(), limit=limit)
    ids = [row.id for row in rows]
    runs = _count_by_session(runtime, TrainingRunRow, ids)
    samplers = _count_by_session(runtime, SamplingSessionRow, ids)
    now = utcnow()
    sessions = []
    for row in rows:
        age = (now - _utc(row.last_heartbeat)).total_seconds()
        state = row.status if row.status != "active" else "live" if age <= LIVE_SECONDS else "stale"
        sessions.append({
            "session_id": row.id, "display_name": row.display_name, "tags": row.tags or [],
            "status": row.status, "state": state, "created_at": _iso(row.created_at),
            "last_heartbeat": _iso(row.last_heartbeat), "heartbeat_age_s": round(age, 1),
            "training_runs": runs.get(row.id, 0), "samplers": samplers.get(row.id, 0),
        })
    return {"sessions": sessions, "total": total, "now": now.isoformat()}


def _count_by_session(runtime: Runtime, model: type, session_ids: list[str]) -> dict[str, int]:
    if not session_ids:
        return {}
    with runtime.store.session() as session:
        query = (select(model.session_id, func.count()).where(model.session_id.in_(session_ids))
                 .group_by(model.session_id))
        return {session_id: count for session_id, count in session.execute(query)}


def _run_summaries(runtime: Runtime, rows: list[TrainingRunRow]) -> list[dict]:
    ids = [row.id for row in rows]
    counts: dict[str, dict[str, int]] = {run_id: {} for run_id in ids}
    last_metric: dict[str, datetime] = {}
    last_loss: dict[str, float] = {}
    session_status: dict[str, str] = {}
    if ids:
        with runtime.store.session() as session:
            grouped = (select(MetricRow.training_run_id, MetricRow.request_type, func.count(),
                              func.max(MetricRow.created_at), func.max(MetricRow.seq_id))
                       .where(MetricRow.training_run_id.in_(ids))
                       .group_by(MetricRow.training_run_id, MetricRow.request_type))
            last_fb = []
            for run_id, request_type, count, latest, max_seq in session.execute(grouped):
                counts[run_id][request_type] = count
                latest = _utc(latest)
                if run_id not in last_metric or latest > last_metric[run_id]:
                    last_metric[run_id] = latest
                if request_type == "ForwardBackward":
                    last_fb.append((run_id, max_seq))
            for run_id, seq_id in last_fb:
                metrics = session.scalar(select(MetricRow.metrics).where(
                    MetricRow.training_run_id == run_id, MetricRow.seq_id == seq_id).limit(1))
                if metrics and "loss:sum" in metrics:
                    tokens = metrics.get("ntokens:sum") or 0
                    last_loss[run_id] = metrics["loss:sum"] / tokens if tokens else metrics["loss:sum"]
            session_ids = {row.session_id for row in rows}
            query = select(SessionRow.id, SessionRow.status).where(SessionRow.id.in_(session_ids))
            session_status = dict(session.execute(query).all())
    now = utcnow()
    out = []
    for row in rows:
        last = max(filter(None, [_utc(row.last_request_time), last_metric.get(row.id)]))
        if row.corrupted:
            status = "corrupted"
        elif session_status.get(row.session_id, "active") != "active":
            status = "finished"
        elif not runtime.scheduler.has_model(row.id):
            status = "unloaded"
        elif (now - last).total_seconds() <= ACTIVE_SECONDS:
            status = "training"
        else:
            status = "idle"
        out.append({
            "training_run_id": row.id, "session_id": row.session_id, "base_model": row.base_model,
            "lora": {"rank": row.lora_rank, "seed": row.seed, "train_mlp": row.train_mlp,
                     "train_attn": row.train_attn, "train_unembed": row.train_unembed},
            "steps": counts[row.id].get("OptimStep", 0),
            "forward_backward": counts[row.id].get("ForwardBackward", 0),
            "last_loss": last_loss.get(row.id), "status": status, "created_at": _iso(row.created_at),
            "last_activity": _iso(last), "user_metadata": row.user_metadata,
        })
    return out


@router.get("/api/v1/dashboard/runs")
def dashboard_runs(runtime: RuntimeDep, tenant: TenantDep, limit: Limit = 100) -> dict:
    """The tenant's most recent training runs: base model, LoRA config, steps taken, status."""
    rows, total = runtime.store.list(TrainingRunRow, tenant, order_by=TrainingRunRow.created_at.desc(),
                                     limit=limit)
    return {"training_runs": _run_summaries(runtime, rows), "total": total}


@router.get("/api/v1/dashboard/runs/{run_id}")
def dashboard_run(run_id: str, runtime: RuntimeDep, tenant: TenantDep) -> dict:
    return _run_summaries(runtime, [runtime.training_run(run_id, tenant)])[0]


class TokenizeRequest(BaseModel):
    text: str = Field(max_length=200_000)
    base_model: str | None = None
    model_path: str | None = None  # a tinker:// checkpoint: its run's base model's tokenizer


class DetokenizeRequest(BaseModel):
    tokens: list[int] = Field(max_length=100_000)
    base_model: str | None = None
    model_path: str | None = None


def _tokenizer(runtime: Runtime, tenant: str, base_model: str | None, model_path: str | None):
    if model_path is not None:
        base_model = runtime.checkpoint_base_model(model_path, tenant)
    if base_model is None:
        raise bad_request("give base_model or model_path")
    info = runtime.model_info(base_model)
    return info, runtime.engine.tokenizer(info.name)


@router.post("/api/v1/dashboard/tokenize")
def dashboard_tokenize(body: TokenizeRequest, runtime: RuntimeDep, tenant: TenantDep) -> dict:
    """Text to token ids with the base model's tokenizer (the playground has none of its own)."""
    info, tokenizer = _tokenizer(runtime, tenant, body.base_model, body.model_path)
    return {"base_model": info.name, "tokens": tokenizer.encode(body.text, add_special_tokens=False)}


@router.post("/api/v1/dashboard/detokenize")
def dashboard_detokenize(body: DetokenizeRequest, runtime: RuntimeDep, tenant: TenantDep) -> dict:
    """Token ids to text, and each token's own text, for showing samples token by token."""
    info, tokenizer = _tokenizer(runtime, tenant, body.base_model, body.model_path)
    bound = max(info.vocab_size, len(tokenizer))
    if any(not 0 <= token < bound for token in body.tokens):
        raise bad_request(f"token ids must be between 0 and {bound - 1}")
    return {"base_model": info.name, "text": tokenizer.decode(body.tokens),
            "pieces": [tokenizer.decode([token]) for token in body.tokens]}
