"""`GET /metrics`: the server's own metrics, in the Prometheus text format (`?format=json` for JSON).

Recorded for every HTTP request (by route template, so ids do not explode the label set):

- `tinkex_server_requests_total{route,method,status}` (counter)
- `tinkex_server_request_duration_seconds{route}` (histogram, including streamed bodies)
- `tinkex_server_requests_in_flight` (gauge)

Read at scrape time: pending futures, queued engine work, loaded models, active sessions, training
runs, checkpoints, base models served, uptime and resident memory.

No API key is needed (as for most exporters), and nothing tenant-specific is exposed: counts only.
Bind the server to loopback, or firewall the port, if even that is too much.
"""

from __future__ import annotations

import os
import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from tinkex.client.metrics import MetricsRegistry

from ..runtime import Runtime
from ..store import CheckpointRow, SessionRow, TrainingRunRow

router = APIRouter()
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def install(app: FastAPI, runtime: Runtime) -> MetricsRegistry:
    """Add `/metrics` and the request-recording middleware to the app (call once, in create_app)."""
    registry = MetricsRegistry()
    for name, kind, help in (
        ("tinkex_server_requests_total", "counter", "HTTP requests answered, by route template, method and status."),
        ("tinkex_server_request_duration_seconds", "histogram", "Time to answer a request (body included)."),
        ("tinkex_server_requests_in_flight", "gauge", "Requests being answered now."),
        ("tinkex_server_futures_pending", "gauge", "Accepted requests whose result is not ready yet."),
        ("tinkex_server_engine_queue_depth", "gauge", "Requests admitted and unfinished (queued, waiting for a seq_id, decoding); bounded by --max-queued-requests."),
        ("tinkex_server_models_loaded", "gauge", "Training models loaded in this process."),
        ("tinkex_server_sessions_active", "gauge", "Sessions that are open."),
        ("tinkex_server_training_runs", "gauge", "Training runs in the store."),
        ("tinkex_server_checkpoints", "gauge", "Checkpoints in the store."),
        ("tinkex_server_base_models", "gauge", "Base models this server serves."),
        ("tinkex_server_uptime_seconds", "gauge", "Seconds since the server started."),
        ("process_resident_memory_bytes", "gauge", "Resident memory of the server process."),
    ):
        registry.describe(name, kind, help)  # type: ignore[arg-type]
    started = time.monotonic()
    registry.add_collector(lambda reg: _collect(reg, runtime, started))
    app.state.metrics = registry
    app.add_middleware(_RequestMetrics, registry=registry)
    app.include_router(router)
    return registry


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, format: str = "prometheus"):
    registry: MetricsRegistry = request.app.state.metrics
    if format == "json":
        return JSONResponse(registry.snapshot())
    return PlainTextResponse(registry.to_prometheus(), media_type=PROMETHEUS_CONTENT_TYPE)


class _RequestMetrics:
    """Pure ASGI middleware (streams pass through untouched)."""

    def __init__(self, app: Any, registry: MetricsRegistry):
        self.app = app
        self.registry = registry

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def record_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        started = time.perf_counter()
        self.registry.add_gauge("tinkex_server_requests_in_flight", 1)
        try:
            await self.app(scope, receive, record_status)
        finally:
            self.registry.add_gauge("tinkex_server_requests_in_flight", -1)
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.registry.increment("tinkex_server_requests_total", route=route, method=scope.get("method", ""),
                                    status=str(status[0]))
            self.registry.observe("tinkex_server_request_duration_seconds", time.perf_counter() - started,
                                  route=route)


def _collect(registry: MetricsRegistry, runtime: Runtime, started: float) -> None:
    registry.set_gauge("tinkex_server_uptime_seconds", time.monotonic() - started)
    _try(registry, "tinkex_server_futures_pending",
         lambda: sum(1 for f in list(runtime.futures._futures.values()) if f.outcome is None))
    _try(registry, "tinkex_server_engine_queue_depth", runtime.scheduler.queued)
    _try(registry, "tinkex_server_models_loaded", lambda: len(runtime.scheduler._models))
    _try(registry, "tinkex_server_sessions_active", lambda: runtime.store.count(SessionRow, status="active"))
    _try(registry, "tinkex_server_training_runs", lambda: runtime.store.count(TrainingRunRow))
    _try(registry, "tinkex_server_checkpoints", lambda: runtime.store.count(CheckpointRow))
    _try(registry, "tinkex_server_base_models", lambda: len(runtime.engine.model_infos()))
    _try(registry, "process_resident_memory_bytes", _resident_bytes)


def _try(registry: MetricsRegistry, name: str, read: Any) -> None:
    """A gauge read from internals that may change shape: skipped, not fatal, when unreadable."""
    try:
        value = read()
    except Exception:
        return
    if value is not None:
        registry.set_gauge(name, float(value))


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
