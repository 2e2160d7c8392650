"""LeanRoute: the per-step routes without FastAPI's per-request dependency solving.

FastAPI's route handler works out every request from the endpoint's declared parameters: it reads
and content-sniffs the body, walks the dependency tree, validates each parameter and the return
value. On the routes every training step and every sample call (forward_backward, optim_step,
asample, retrieve_future) that was most of the server's time for the request: ~1 ms of CPU per
training step, under the GIL the engine thread needs too.

A LeanRoute looks at its endpoint once, when the route is built. An `async def` endpoint that takes
nothing but the `Request`, the runtime and tenant dependencies (deps.py) and at most one pydantic
body model, and returns a Response or a pydantic model, is called directly: the tenant check first
(401, as FastAPI would), then the body (`model_validate_json`; a bad one raises
RequestValidationError, which the app answers 400 as for any route), then the endpoint, whose model
is sent as FastAPI sends it (JSON by alias). Every other endpoint gets FastAPI's own handler. The
route stays a FastAPI route: same path, middleware, exception handlers and OpenAPI schema.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from .deps import get_runtime, get_tenant

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class LeanRoute(APIRoute):
    def get_route_handler(self) -> Handler:
        return _direct_handler(self) or super().get_route_handler()


def _direct_handler(route: APIRoute) -> Handler | None:
    """The endpoint called directly, or None where it takes or returns what only FastAPI resolves."""
    endpoint, dependant = route.endpoint, route.dependant
    if (not inspect.iscoroutinefunction(endpoint) or route.dependencies or dependant.path_params
            or dependant.query_params or dependant.header_params or dependant.cookie_params
            or len(dependant.body_params) > 1):
        return None
    try:
        returns = typing.get_type_hints(endpoint).get("return")
    except (NameError, TypeError):  # an annotation that does not resolve here: FastAPI's handler copes
        return None
    if not (isinstance(returns, type) and issubclass(returns, (Response, BaseModel))):
        return None
    dependencies = [(sub.name, sub.call) for sub in dependant.dependencies]
    if any(call not in (get_runtime, get_tenant) for _, call in dependencies):
        return None
    body: tuple[str, type[BaseModel]] | None = None
    if dependant.body_params:
        field = dependant.body_params[0]
        model = field.field_info.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        body = (field.name, model)
    request_name, status_code = dependant.request_param_name, route.status_code or 200

    async def handler(request: Request) -> Response:
        arguments: dict[str, Any] = {request_name: request} if request_name else {}
        for name, call in dependencies:  # the tenant's 401 comes before any body error, as in FastAPI
            arguments[name] = await call(request)
        if body is not None:
            name, model = body
            try:
                arguments[name] = model.model_validate_json(await request.body())
            except ValidationError as exc:
                raise RequestValidationError(exc.errors(include_url=False)) from None
        result = await endpoint(**arguments)
        if isinstance(result, Response):
            return result
        return Response(result.model_dump_json(by_alias=True), status_code=status_code,
                        media_type="application/json")

    return handler
