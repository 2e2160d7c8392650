"""RestClient: training runs, checkpoints, sessions, samplers and weights information (no session)."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import os
import uuid
import warnings
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urljoin

from pydantic import BaseModel

from ..types import (
    APIStatusError,
    CheckpointArchiveUrlResponse,
    CheckpointsListResponse,
    CopyWeightsResponse,
    ExternalWeightsUrlsResponse,
    GetSamplerResponse,
    GetServerCapabilitiesResponse,
    GetSessionResponse,
    ListSessionsResponse,
    ParsedCheckpointTinkerPath,
    SessionSearchRequest,
    SessionSearchResponse,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoResponse,
    WhoamiResponse,
)
from ..types._exceptions import TinkerError
from ._futures import APIFuture, sdk_method, validate
from ._holder import sessionless_holder

if TYPE_CHECKING:
    from ._holder import Holder
    from .admin_client import AuditLogResponse, BillingUsageResponse, CurrentCheckpointStorageUsageResponse

AccessScope = Literal["owned", "accessible"]


class ExperimentalWarning(FutureWarning):
    """A feature whose API may still change."""


class _RestBase:
    def __init__(self, _holder: Holder | None = None, *, base_url: str | None = None, api_key: str | None = None):
        self.holder = _holder if _holder is not None else sessionless_holder(base_url, api_key)

    async def _request(self, method: str, path: str, *, model: type[BaseModel] | None = None,
                       params: dict[str, Any] | None = None, json: Any = None,
                       headers: dict[str, str] | None = None, idempotency_key: str | None = None,
                       **multipart: Any) -> Any:
        holder = self.holder
        await holder.ensure_ready()
        clean = {key: value for key, value in (params or {}).items() if value is not None}
        response = await holder.execute_with_retries(lambda: holder.transport.request(
            method, path, purpose="rest", params=clean or None, json=json, headers=headers,
            idempotency_key=idempotency_key, **multipart))
        if model is None:
            return None
        return validate(response, model)

    def _future(self, *args: Any, **kwargs: Any) -> APIFuture[Any]:
        return self.holder.run(self._request(*args, **kwargs))

    def get_telemetry(self) -> Any:
        return self.holder.telemetry


def _checkpoint_path(tinker_path: str) -> tuple[ParsedCheckpointTinkerPath, str]:
    parsed = ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
    return parsed, f"/api/v1/training_runs/{parsed.training_run_id}/checkpoints/{parsed.checkpoint_id}"


class RestClient(_RestBase):
    """REST access to the resources of an account; every method returns an APIFuture."""

    @sdk_method("RestClient.get_server_capabilities")
    def get_server_capabilities(self) -> APIFuture[GetServerCapabilitiesResponse]:
        return self._future("GET", "/api/v1/get_server_capabilities", model=GetServerCapabilitiesResponse)

    # ---- training runs -----------------------------------------------------------------------

    @sdk_method("RestClient.get_training_run")
    def get_training_run(self, training_run_id: str, access_scope: AccessScope = "owned") -> APIFuture[TrainingRun]:
        return self._future("GET", f"/api/v1/training_runs/{training_run_id}", model=TrainingRun,
                            params={"access_scope": access_scope})

    @sdk_method("RestClient.get_training_run_async")
    async def get_training_run_async(self, training_run_id: str, access_scope: AccessScope = "owned") -> TrainingRun:
        return await self.get_training_run(training_run_id, access_scope)

    @sdk_method("RestClient.get_training_run_by_tinker_path")
    def get_training_run_by_tinker_path(self, tinker_path: str, access_scope: AccessScope = "owned"
                                        ) -> APIFuture[TrainingRun]:
        parsed = ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        return self.get_training_run(parsed.training_run_id, access_scope)

    @sdk_method("RestClient.get_training_run_by_tinker_path_async")
    async def get_training_run_by_tinker_path_async(self, tinker_path: str, access_scope: AccessScope = "owned"
                                                    ) -> TrainingRun:
        return await self.get_training_run_by_tinker_path(tinker_path, access_scope)

    @sdk_method("RestClient.get_weights_info_by_tinker_path")
    def get_weights_info_by_tinker_path(self, tinker_path: str) -> APIFuture[WeightsInfoResponse]:
        return self._future("POST", "/api/v1/weights_info", model=WeightsInfoResponse,
                            json={"tinker_path": tinker_path})

    @sdk_method("RestClient.list_training_runs")
    def list_training_runs(self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned",
                           project_id: str | None = None) -> APIFuture[TrainingRunsResponse]:
        return self._future("GET", "/api/v1/training_runs", model=TrainingRunsResponse,
                            params={"limit": limit, "offset": offset, "access_scope": access_scope,
                                    "project_id": project_id})

    @sdk_method("RestClient.list_training_runs_async")
    async def list_training_runs_async(self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned",
                                       project_id: str | None = None) -> TrainingRunsResponse:
        return await self.list_training_runs(limit, offset, access_scope, project_id)

    # ---- checkpoints -------------------------------------------------------------------------

    @sdk_method("RestClient.list_checkpoints")
    def list_checkpoints(self, training_run_id: str) -> APIFuture[CheckpointsListResponse]:
        return self._future("GET", f"/api/v1/training_runs/{training_run_id}/checkpoints",
                            model=CheckpointsListResponse)

    @sdk_method("RestClient.list_checkpoints_async")
    async def list_checkpoints_async(self, training_run_id: str) -> CheckpointsListResponse:
        return await self.list_checkpoints(training_run_id)

    @sdk_method("RestClient.list_user_checkpoints")
    def list_user_checkpoints(self, limit: int = 100, offset: int = 0) -> APIFuture[CheckpointsListResponse]:
        return self._future("GET", "/api/v1/checkpoints", model=CheckpointsListResponse,
                            params={"limit": limit, "offset": offset})

    @sdk_method("RestClient.list_user_checkpoints_async")
    async def list_user_checkpoints_async(self, limit: int = 100, offset: int = 0) -> CheckpointsListResponse:
        return await self.list_user_checkpoints(limit, offset)

    @sdk_method("RestClient.get_external_weights_urls")
    def get_external_weights_urls(self, tinker_path: str) -> APIFuture[ExternalWeightsUrlsResponse]:
        parsed, path = _checkpoint_path(tinker_path)
        if parsed.checkpoint_type != "external":
            raise ValueError(f"download URLs exist for external_weights checkpoints only, not {tinker_path!r}")
        return self._future("GET", f"{path}/external_weights_urls", model=ExternalWeightsUrlsResponse)

    @sdk_method("RestClient.get_external_weights_urls_async")
    async def get_external_weights_urls_async(self, tinker_path: str) -> ExternalWeightsUrlsResponse:
        return await self.get_external_weights_urls(tinker_path)

    @sdk_method("RestClient.delete_checkpoint")
    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        return self._future("DELETE", f"/api/v1/training_runs/{training_run_id}/checkpoints/{checkpoint_id}")

    @sdk_method("RestClient.delete_checkpoint_async")
    async def delete_checkpoint_async(self, training_run_id: str, checkpoint_id: str) -> None:
        return await self.delete_checkpoint(training_run_id, checkpoint_id)

    @sdk_method("RestClient.delete_checkpoint_from_tinker_path")
    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return self._future("DELETE", _checkpoint_path(tinker_path)[1])

    @sdk_method("RestClient.delete_checkpoint_from_tinker_path_async")
    async def delete_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        return await self.delete_checkpoint_from_tinker_path(tinker_path)

    @sdk_method("RestClient.publish_checkpoint_from_tinker_path")
    def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return self._future("POST", f"{_checkpoint_path(tinker_path)[1]}/publish")

    @sdk_method("RestClient.publish_checkpoint_from_tinker_path_async")
    async def publish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        return await self.publish_checkpoint_from_tinker_path(tinker_path)

    @sdk_method("RestClient.unpublish_checkpoint_from_tinker_path")
    def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return self._future("DELETE", f"{_checkpoint_path(tinker_path)[1]}/publish")

    @sdk_method("RestClient.unpublish_checkpoint_from_tinker_path_async")
    async def unpublish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        return await self.unpublish_checkpoint_from_tinker_path(tinker_path)

    @sdk_method("RestClient.set_checkpoint_ttl_from_tinker_path")
    def set_checkpoint_ttl_from_tinker_path(self, tinker_path: str, ttl_seconds: int | None) -> APIFuture[None]:
        return self._future("PUT", f"{_checkpoint_path(tinker_path)[1]}/ttl", json={"ttl_seconds": ttl_seconds})

    @sdk_method("RestClient.set_checkpoint_ttl_from_tinker_path_async")
    async def set_checkpoint_ttl_from_tinker_path_async(self, tinker_path: str, ttl_seconds: int | None) -> None:
        return await self.set_checkpoint_ttl_from_tinker_path(tinker_path, ttl_seconds)

    @sdk_method("RestClient.copy_weights")
    def copy_weights(self, path: str, destination_project_id: str | None = None, *, ttl_seconds: int | None = None,
                     weights_access_token: str | None = None) -> APIFuture[str]:
        """Copy a checkpoint into a project; returns the new tinker path."""
        destination_project_id = destination_project_id or os.environ.get("TINKER_PROJECT_ID") or None
        if destination_project_id is None:
            raise ValueError("Provide destination_project_id or set TINKER_PROJECT_ID")
        body = {"source_path": path, "destination_project_id": destination_project_id}
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        headers = {"X-Tinker-Weights-Access-Token": weights_access_token} if weights_access_token else None

        async def run() -> str:
            result = await self._request("POST", "/api/v1/copy_weights", model=CopyWeightsResponse, json=body,
                                         headers=headers, idempotency_key=str(uuid.uuid4()))
            return result.tinker_path

        return self.holder.run(run())

    @sdk_method("RestClient.copy_weights_async")
    async def copy_weights_async(self, path: str, destination_project_id: str | None = None, *,
                                 ttl_seconds: int | None = None, weights_access_token: str | None = None) -> str:
        return await self.copy_weights(path, destination_project_id, ttl_seconds=ttl_seconds,
                                       weights_access_token=weights_access_token)

    # ---- sessions and samplers ---------------------------------------------------------------

    @sdk_method("RestClient.get_session")
    def get_session(self, session_id: str, access_scope: AccessScope = "owned") -> APIFuture[GetSessionResponse]:
        return self._future("GET", f"/api/v1/sessions/{session_id}", model=GetSessionResponse,
                            params={"access_scope": access_scope})

    @sdk_method("RestClient.get_session_async")
    async def get_session_async(self, session_id: str, access_scope: AccessScope = "owned") -> GetSessionResponse:
        return await self.get_session(session_id, access_scope)

    @sdk_method("RestClient.list_sessions")
    def list_sessions(self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned"
                      ) -> APIFuture[ListSessionsResponse]:
        return self._future("GET", "/api/v1/sessions", model=ListSessionsResponse,
                            params={"limit": limit, "offset": offset, "access_scope": access_scope})

    @sdk_method("RestClient.list_sessions_async")
    async def list_sessions_async(self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned"
                                  ) -> ListSessionsResponse:
        return await self.list_sessions(limit, offset, access_scope)

    @sdk_method("RestClient.assign_session_project")
    def assign_session_project(self, session_id: str, project_id: str) -> APIFuture[None]:
        return self._future("PUT", f"/api/v1/sessions/{session_id}/project", json={"project_id": project_id})

    @sdk_method("RestClient.assign_session_project_async")
    async def assign_session_project_async(self, session_id: str, project_id: str) -> None:
        return await self.assign_session_project(session_id, project_id)

    @sdk_method("RestClient.export_session_trace")
    def export_session_trace(self, session_id: str) -> APIFuture[str]:
        """Ask the server for a session trace and return its download URL once ready (polled every 5 s)."""

        async def run() -> str:
            while True:
                holder = self.holder
                await holder.ensure_ready()
                response = await holder.execute_with_retries(lambda: holder.transport.request(
                    "GET", f"/api/v1/sessions/{session_id}/trace_export", purpose="rest"))
                body = response.json()
                status = body.get("status")
                if status == "ready" and body.get("url"):
                    return str(body["url"])
                if status == "failed":
                    raise TinkerError(f"trace export failed: {body.get('error') or 'unknown error'}")
                await asyncio.sleep(5.0)

        return self.holder.run(run())

    @sdk_method("RestClient.export_session_trace_async")
    async def export_session_trace_async(self, session_id: str) -> str:
        return await self.export_session_trace(session_id)

    @sdk_method("RestClient.search_sessions")
    def search_sessions(self, request: SessionSearchRequest) -> APIFuture[SessionSearchResponse]:
        warnings.warn("search_sessions is experimental", ExperimentalWarning, stacklevel=2)
        if not isinstance(request, SessionSearchRequest):
            request = SessionSearchRequest.model_validate(
                request.model_dump() if hasattr(request, "model_dump") else request)
        return self._future("POST", "/api/v1/sessions/search", model=SessionSearchResponse,
                            json=request.to_json_dict())

    @sdk_method("RestClient.get_sampler")
    def get_sampler(self, sampler_id: str) -> APIFuture[GetSamplerResponse]:
        return self._future("GET", f"/api/v1/samplers/{sampler_id}", model=GetSamplerResponse)

    @sdk_method("RestClient.get_sampler_async")
    async def get_sampler_async(self, sampler_id: str) -> GetSamplerResponse:
        return await self.get_sampler(sampler_id)

    def whoami(self) -> APIFuture[WhoamiResponse]:
        """The caller's identity, read from the claims of a JWT credential (no request)."""

        async def run() -> WhoamiResponse:
            await self.holder.ensure_ready()
            key = self.holder.transport.api_key  # the exchanged JWT in JWT mode
            if not key.startswith("eyJ"):
                raise RuntimeError("whoami requires JWT auth, but the credential is a plain API key.")
            return whoami_from_jwt(key)

        return self.holder.run(run())

    # ---- checkpoint archives (tinkex additions) ---------------------------------------------

    @sdk_method("RestClient.get_checkpoint_archive_url_from_tinker_path")
    def get_checkpoint_archive_url_from_tinker_path(self, tinker_path: str) -> APIFuture[CheckpointArchiveUrlResponse]:
        """A download URL for a checkpoint as a tar archive (the server may still be building it: 503s
        are retried every 5 s for up to 5 minutes)."""
        _, path = _checkpoint_path(tinker_path)

        async def run() -> CheckpointArchiveUrlResponse:
            holder = self.holder
            await holder.ensure_ready()
            deadline = asyncio.get_running_loop().time() + 300
            while True:
                try:
                    response = await holder.transport.request("GET", f"{path}/archive", purpose="rest",
                                                              follow_redirects=False, max_retries=2)
                    break
                except APIStatusError as exc:
                    if exc.status_code != 503 or asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(5.0)
            if response.is_redirect:
                location = urljoin(str(response.request.url), response.headers["location"])
                expires = response.headers.get("expires")
                return CheckpointArchiveUrlResponse(url=location, expires=_http_date(expires))
            return validate(response, CheckpointArchiveUrlResponse)

        return self.holder.run(run())

    @sdk_method("RestClient.download_checkpoint")
    def import_adapter(self, directory: str | os.PathLike[str], base_model: str, name: str) -> APIFuture[str]:
        """Upload a PEFT LoRA adapter directory (a tinkex addition); returns its new sampler checkpoint path."""
        folder = Path(directory)
        files = {"config": folder / "adapter_config.json", "weights": folder / "adapter_model.safetensors"}

        async def run() -> str:
            holder = self.holder
            await holder.ensure_ready()
            response = await holder.execute_with_retries(lambda: holder.transport.request(
                "POST", "/api/v1/checkpoints/import", purpose="rest", files=files,
                data={"name": name, "base_model": base_model}))
            return response.json()["tinker_path"]

        return self.holder.run(run())

    def download_checkpoint(self, tinker_path: str, output_dir: str | os.PathLike[str] | None = None, *,
                            force: bool = False, progress: Callable[[int, int | None], None] | bool | None = None,
                            resume: bool = True, verify: bool = True, memory_budget: int = 1 << 20
                            ) -> APIFuture[Path]:
        """Download a checkpoint into `output_dir/<run>_<segment>_<name>/` and return that directory.

        Training and sampler checkpoints come as a tar archive, external ones file by file; either
        way streamed to disk in blocks of at most `memory_budget` bytes, checked against the server's
        SHA-256 and the checkpoint's own tinkex_state.json, and resumed (HTTP Range) after an
        interruption. `progress` is `fn(done_bytes, total_bytes)`, or True for a progress bar on
        stderr. See `tinkex.client.download`.
        """
        from . import download

        target = download.target_dir(tinker_path, output_dir)
        if target.exists() and not force:
            raise FileExistsError(f"{target} exists (pass force=True to replace it)")
        return self.holder.run(download.download_checkpoint(
            self, tinker_path, output_dir, force=force, progress=progress, resume=resume, verify=verify,
            memory_budget=memory_budget))

    # ---- admin, kept here for old code -------------------------------------------------------

    def _admin(self) -> Any:
        from .admin_client import AdminClient
        return AdminClient(self.holder)

    def get_audit_log(self, event_type: Literal["all", "checkpoints", "projects", "teams", "organizations"] = "all",
                      day: date | None = None) -> APIFuture[AuditLogResponse]:
        return self._admin().get_audit_log(event_type, day)

    async def get_audit_log_async(self, event_type: Literal["all", "checkpoints", "projects", "teams",
                                                            "organizations"] = "all",
                                  day: date | None = None) -> AuditLogResponse:
        return await self.get_audit_log(event_type, day)

    def get_billing_usage(self, starting_on: datetime | str, ending_before: datetime | str
                          ) -> APIFuture[BillingUsageResponse]:
        return self._admin().get_billing_usage(starting_on, ending_before)

    async def get_billing_usage_async(self, starting_on: datetime | str, ending_before: datetime | str
                                      ) -> BillingUsageResponse:
        return await self.get_billing_usage(starting_on, ending_before)

    def get_current_checkpoint_storage_usage(self, project_id: str | None = None
                                             ) -> APIFuture[CurrentCheckpointStorageUsageResponse]:
        return self._admin().get_current_checkpoint_storage_usage(project_id)

    async def get_current_checkpoint_storage_usage_async(self, project_id: str | None = None
                                                         ) -> CurrentCheckpointStorageUsageResponse:
        return await self.get_current_checkpoint_storage_usage(project_id)


def _http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None


def whoami_from_jwt(token: str) -> WhoamiResponse:
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError) as exc:
        raise TinkerError("the credential is not a readable JWT") from exc
    org = claims.get("org_id")
    return WhoamiResponse(user_urn=str(claims.get("sub", "")), org_urn=f"tml:organization:{org}" if org else "",
                          email=claims.get("email"))
