"""The FastAPI application: routers, error handling, body limits and (for tests) fault injection."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy.exc import DataError

from .deps import get_tenant
from .routers import dashboard, downloads, futures, metrics, openai, rest, sampling, service, training, uploads
from .runtime import Runtime, ServerSettings
from .scheduler import QueueFull

log = logging.getLogger("tinkex.server")


def _describe(errors: list[dict]) -> str:
    parts = []
    for error in errors[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        parts.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


async def _sweep(runtime: Runtime) -> None:
    """Expire sessions whose heartbeats stopped and checkpoints whose TTL ran out."""
    period = min(30.0, max(0.5, runtime.settings.session_timeout_seconds / 4))
    while True:
        await asyncio.sleep(period)
        for expire in (runtime.expire_sessions, runtime.expire_checkpoints):
            try:
                await asyncio.to_thread(expire)
            except Exception:  # a store hiccup must not end the sweeping for good
                log.exception("%s failed", expire.__name__)


class FaultRule(BaseModel):
    path: str
    status: int
    count: int = 1


def create_app(settings: ServerSettings, engine=None) -> FastAPI:
    runtime = Runtime(settings, engine)
    runtime.scheduler.max_queued = settings.max_queued_requests

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        runtime.futures.bind_loop(asyncio.get_running_loop())
        runtime.start()
        sweeper = asyncio.create_task(_sweep(runtime))
        yield
        sweeper.cancel()
        runtime.stop()

    app = FastAPI(title="tinkex", summary="A Tinker-compatible fine-tuning server", lifespan=lifespan)
    app.state.runtime = runtime
    # Routes are matched in this order, one pattern at a time: the calls every training step and
    # every sample make (retrieve_future, asample, forward_backward, optim_step) come first.
    routers = [module.router for module in (futures, sampling, training, service, rest, downloads, uploads,
                                            openai, dashboard)]
    for router in routers:
        app.include_router(router)
    metrics.install(app, runtime)  # GET /metrics (Prometheus text) and per-route request metrics
    _document_api_key(app, [route for router in routers for route in router.routes])

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # 400 rather than FastAPI's 422: the SDK treats both as final, and 400 is what peers document.
        return JSONResponse(status_code=400, content={"detail": _describe(exc.errors())})

    @app.exception_handler(DataError)
    async def _unstorable(_request: Request, exc: DataError) -> JSONResponse:
        # A value the database refuses, such as a NUL character in an id (PostgreSQL text cannot hold one):
        # bad input, not a server fault.
        reason = str(exc.orig).splitlines()[0] if exc.orig is not None else "invalid value"
        return JSONResponse(status_code=400, content={"detail": f"the request holds a value the store cannot "
                                                                f"keep: {reason}"})

    @app.exception_handler(QueueFull)
    async def _busy(_request: Request, exc: QueueFull) -> JSONResponse:
        # Backpressure both SDKs understand: they wait Retry-After (retry-after-ms is the Stainless SDKs'
        # finer hint) and resubmit the same request; nothing of it was recorded.
        return JSONResponse(status_code=429, content={"detail": str(exc)}, headers={
            "Retry-After": str(max(1, round(exc.retry_after))), "retry-after-ms": str(int(exc.retry_after * 1000))})

    app.add_middleware(_Limits, max_body_bytes=settings.max_body_bytes, faults=runtime.faults)

    if settings.fault_injection:
        @app.post("/api/v1/_test/faults", include_in_schema=False)
        def inject_fault(rule: FaultRule) -> dict:
            runtime.faults[rule.path] = [rule.status, rule.count]
            return {}

    return app


def _document_api_key(app: FastAPI, routes: list) -> None:
    """Put the API key in the OpenAPI schema as a security scheme of the routes that need one. The
    routes read it from the request themselves (deps.get_tenant), so FastAPI does not list it."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "APIKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "Bearer": {"type": "http", "scheme": "bearer"},
            }
            for route in routes:
                if isinstance(route, APIRoute) and _needs_tenant(route.dependant):
                    for method in route.methods:
                        operation = schema["paths"].get(route.path_format, {}).get(method.lower())
                        if operation is not None:
                            operation["security"] = [{"APIKey": []}, {"Bearer": []}]
        return app.openapi_schema

    app.openapi = openapi


def _needs_tenant(dependant: Dependant) -> bool:
    return any(d.call is get_tenant or _needs_tenant(d) for d in dependant.dependencies)


class _Limits:
    """Pure ASGI middleware (no per-request task or body buffering, unlike @app.middleware): bodies
    over the size limit answer 413 before they are read, and test-injected faults answer as told."""

    def __init__(self, app, max_body_bytes: int, faults: dict[str, list[int]]):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.faults = faults

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            answer = self._refusal(scope)
            if answer is not None:
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope) -> JSONResponse | None:
        length = next((value for name, value in scope["headers"] if name == b"content-length"), b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return JSONResponse(status_code=413, content={
                "detail": f"request body of {int(length)} bytes exceeds the limit of {self.max_body_bytes}"})
        rule = self.faults.get(scope["path"])
        if rule is not None and rule[1] > 0:
            rule[1] -= 1
            return JSONResponse(status_code=rule[0], content={"detail": f"injected fault {rule[0]}"},
                                headers={"retry-after-ms": "50"})
        return None
