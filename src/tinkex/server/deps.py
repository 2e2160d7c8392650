"""FastAPI dependencies shared by the routers: the runtime and the caller's tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from .runtime import Runtime

# Both are `async def` although they never await: FastAPI runs a plain `def` dependency in its thread
# pool, and two thread hops per request cost more than the key's hash they guard. Both read the
# request itself rather than declare Header parameters or each other: FastAPI resolves declared
# parameters and sub-dependencies anew on every request, which cost more than the routes' own work.


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_tenant(request: Request) -> str:
    headers = request.headers
    key = headers.get("x-api-key")
    if key is None:
        authorization = headers.get("authorization")
        if authorization and authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
    tenant = request.app.state.runtime.tenant_for(key)
    if tenant is None:
        raise HTTPException(
            status_code=401,
            detail="missing or unknown API key (send it in the X-API-Key header)",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return tenant


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
TenantDep = Annotated[str, Depends(get_tenant)]
