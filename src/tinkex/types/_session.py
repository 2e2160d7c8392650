"""Client configuration, sessions, heartbeats, telemetry and the future-polling protocol."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ._base import WireModel
from ._exceptions import RequestErrorCategory

QueueState = Literal["active", "paused_capacity", "paused_rate_limit"]


class ClientConfigRequest(WireModel):
    sdk_version: str | None = None


class ClientConfigResponse(WireModel):
    """Server flags read by clients at start-up; a minimal server may answer {}."""

    pjwt_auth_enabled: bool = False
    credential_default_source: str = "api_key"
    sample_dispatch_bytes_semaphore_size: int = 10 * 1024 * 1024
    inflight_response_bytes_semaphore_size: int = 50 * 1024 * 1024
    parallel_fwdbwd_chunks: bool = True
    proto_compress_fwdbwd: bool = False
    fwdbwd_max_chunk_len: int = 1024
    fwdbwd_max_chunk_bytes_count: int = 5_000_000
    fwdbwd_dispatch_bytes_semaphore_size: int = 50_000_000
    billing_exception_max_pause_duration_sec: float = 3600
    sample_no_retries: bool = False
    sample_enable_stuck_detection: bool = True
    sample_max_concurrent_requests: int = 2000
    use_pyqwest_transport: bool = True
    sample_use_retrieve_futures: bool = False
    custom_loss_server_side: bool = False
    sample_join_sampling_session: bool = False
    # Flags read by SDKs before 0.25, which sent JSON unless told otherwise.
    proto_write_fwdbwd: bool | None = None
    fwd_via_fwdbwd: bool | None = None


class ClientDynamicConfigResponse(WireModel):
    refresh_interval_sec: float = 300
    sample_cancel_enabled: bool = False
    sample_cancel_max_batch_size: int = 64


class CreateSessionRequest(WireModel):
    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None
    type: Literal["create_session"] = "create_session"


class CreateSessionResponse(WireModel):
    session_id: str
    info_message: str | None = None
    warning_message: str | None = None
    error_message: str | None = None
    type: Literal["create_session"] = "create_session"


class SessionHeartbeatRequest(WireModel):
    session_id: str
    type: Literal["session_heartbeat"] = "session_heartbeat"


class SessionHeartbeatResponse(WireModel):
    type: Literal["session_heartbeat"] = "session_heartbeat"


class FinishReason(WireModel):
    type: Literal["success", "errored", "interrupted"]


class SessionFinishRequest(WireModel):
    reason: FinishReason
    detail: str | None = None


class TelemetrySendRequest(WireModel):
    events: list[dict[str, Any]] = Field(default_factory=list)
    platform: str | None = None
    sdk_version: str | None = None
    session_id: str | None = None
    process_uuid: str | None = None


class TelemetryResponse(WireModel):
    status: Literal["accepted"] = "accepted"


class UntypedAPIFuture(WireModel):
    """The immediate answer of every asynchronous endpoint."""

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


class FutureRetrieveRequest(WireModel):
    request_id: str
    allow_metadata_only: bool = False


class TryAgainResponse(WireModel):
    type: Literal["try_again"] = "try_again"
    request_id: str
    queue_state: QueueState = "active"
    queue_state_reason: str | None = None


class RequestFailedResponse(WireModel):
    error: str
    category: RequestErrorCategory = RequestErrorCategory.Unknown


class CancelFutureRequest(WireModel):
    request_id: str
