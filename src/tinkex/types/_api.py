"""Wire shapes used by the client surface beyond training and sampling basics.

Optimizer choices, external weights, copies, custom losses, sampler joins, session search, the
admin endpoints (audit log, billing) and whoami.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, TypeAlias, Union

import numpy as np
from pydantic import ConfigDict, Field, SerializeAsAny, field_validator

from ._base import WireModel
from ._tensor import TensorData
from ._training import AdamOptimizerConfig, AdamParams

# ---- optimizers ---------------------------------------------------------------------------------


class OptimizerConfigBase(WireModel):
    """Any optimizer the server may offer; chosen once, when a model is created."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: str


class DimuonOptimizerConfig(OptimizerConfigBase):
    type: Literal["dimuon"] = "dimuon"
    version: Literal[1] = 1


OptimizerConfig: TypeAlias = AdamOptimizerConfig | SerializeAsAny[OptimizerConfigBase]


class OptimParamsBase(WireModel):
    """Per-step hyperparameters of a non-Adam optimizer (sent as `optimizer_params`)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: str


class DimuonParams(OptimParamsBase):
    type: Literal["dimuon"] = "dimuon"
    learning_rate: float = Field(ge=0)
    grad_clip_norm: float = 0.0
    beta1: float = Field(default=0.9, ge=0, lt=1)

    @field_validator("learning_rate", "grad_clip_norm", "beta1")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


OptimParams: TypeAlias = AdamParams | SerializeAsAny[OptimParamsBase]

# ---- weights ------------------------------------------------------------------------------------


class SaveWeightsExternalRequest(WireModel):
    model_id: str
    path: str
    seq_id: int | None = None
    ttl_seconds: int | None = None
    age_encryption_recipients: list[str] | None = None
    type: Literal["save_weights_external"] = "save_weights_external"


class SaveWeightsExternalResponse(WireModel):
    path: str
    size_bytes: int | None = None
    type: Literal["save_weights_external"] = "save_weights_external"


class ExternalWeightsUrlsResponse(WireModel):
    urls: dict[str, str]
    expires: datetime


class CopyWeightsRequest(WireModel):
    source_path: str
    destination_project_id: str | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    ttl_seconds: int | None = None
    weights_access_token: str | None = None  # sent as the X-Tinker-Weights-Access-Token header


class CopyWeightsResponse(WireModel):
    tinker_path: str


class WhoamiResponse(WireModel):
    user_urn: str
    org_urn: str
    email: str | None = None


# ---- sampling extras ----------------------------------------------------------------------------


class JoinSamplingSessionRequest(WireModel):
    sampling_session_id: str
    type: Literal["join_sampling_session"] = "join_sampling_session"


class JoinSamplingSessionResponse(WireModel):
    client_counter: int
    type: Literal["join_sampling_session"] = "join_sampling_session"


@dataclass(frozen=True)
class TopkLogprobs:
    """A dense top-k table: token_ids int32 [N, K] and logprobs float32 [N, K]; empty cells (0, -99999)."""

    token_ids: np.ndarray
    logprobs: np.ndarray


class PromptAltTokens(WireModel):
    """Alternative draws for each prompt position after the first: both [len(prompt) - 1, k]."""

    tokens: TensorData
    logprobs: TensorData


# ---- custom losses ------------------------------------------------------------------------------

CustomLossInputRank: TypeAlias = Literal[0, 1, 2]


class CustomLossInput(WireModel):
    name: str
    rank: CustomLossInputRank


class CustomLossNode(WireModel):
    op: Literal["placeholder", "get_attr", "call_function", "call_method", "call_module", "output"]
    name: str
    target: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class CustomLossGraph(WireModel):
    format: Literal[1] = 1
    nodes: list[CustomLossNode]


class CreateCustomLossRequest(WireModel):
    session_id: str
    custom_loss_seq_id: int
    name: str
    inputs: list[CustomLossInput]
    graph: CustomLossGraph
    type: Literal["create_custom_loss"] = "create_custom_loss"


class CreateCustomLossResponse(WireModel):
    loss_id: str
    type: Literal["create_custom_loss"] = "create_custom_loss"


# ---- session search -----------------------------------------------------------------------------


class OwnSearchOwner(WireModel):
    type: Literal["own"] = "own"


class AccessibleSearchOwner(WireModel):
    type: Literal["accessible"] = "accessible"


class UserSearchOwner(WireModel):
    type: Literal["user"] = "user"
    owner_urns: list[str] = Field(min_length=1, max_length=10)


SearchOwner: TypeAlias = Annotated[
    Union[OwnSearchOwner, AccessibleSearchOwner, UserSearchOwner], Field(discriminator="type")
]

ClientSessionFinishReasonType: TypeAlias = Literal["success", "errored", "interrupted"]


class ActiveSessionStatusQuery(WireModel):
    type: Literal["active"] = "active"


class CancelledSessionStatusQuery(WireModel):
    type: Literal["cancelled"] = "cancelled"


class FailedSessionStatusQuery(WireModel):
    type: Literal["failed"] = "failed"


class ClientFinishedSessionStatusQuery(WireModel):
    type: Literal["client_finished"] = "client_finished"
    reasons: list[ClientSessionFinishReasonType] | None = Field(default=None, min_length=1)


SessionStatusQuery: TypeAlias = Annotated[
    Union[ActiveSessionStatusQuery, CancelledSessionStatusQuery, FailedSessionStatusQuery,
          ClientFinishedSessionStatusQuery],
    Field(discriminator="type"),
]


class SessionSearchCursor(WireModel):
    last_created_at: datetime
    last_session_id: str


class SessionSearchRequest(WireModel):
    session_id: str | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] = Field(default_factory=dict)
    display_name: str | None = Field(default=None, min_length=1)
    owner: SearchOwner = Field(default_factory=OwnSearchOwner)
    statuses: list[SessionStatusQuery] | None = Field(default=None, min_length=1)
    limit: int = Field(default=50, ge=1, le=200)
    cursor: SessionSearchCursor | None = None


class SessionFailedRequestReason(WireModel):
    type: Literal["request"] = "request"
    request_id: str
    request_type: str


class SessionFailedTrainingRunReason(WireModel):
    type: Literal["training_run"] = "training_run"
    training_run_id: str


class SessionFailedSamplingSessionReason(WireModel):
    type: Literal["sampling_session"] = "sampling_session"
    sampling_session_id: str


SessionFailedReason: TypeAlias = Annotated[
    Union[SessionFailedRequestReason, SessionFailedTrainingRunReason, SessionFailedSamplingSessionReason],
    Field(discriminator="type"),
]


class SessionFailed(WireModel):
    type: Literal["failed"] = "failed"
    category: Literal["user", "internal"]
    reason: SessionFailedReason
    message: str


class SessionCancelled(WireModel):
    type: Literal["cancelled"] = "cancelled"
    detail: str | None = None


class ClientSessionFinishSuccess(WireModel):
    type: Literal["success"] = "success"


class ClientSessionFinishErrored(WireModel):
    type: Literal["errored"] = "errored"


class ClientSessionFinishInterrupted(WireModel):
    type: Literal["interrupted"] = "interrupted"


ClientSessionFinishReason: TypeAlias = Annotated[
    Union[ClientSessionFinishSuccess, ClientSessionFinishErrored, ClientSessionFinishInterrupted],
    Field(discriminator="type"),
]


class ClientSessionFinished(WireModel):
    type: Literal["client_finished"] = "client_finished"
    reason: ClientSessionFinishReason
    detail: str | None = None


class SessionActive(WireModel):
    type: Literal["active"] = "active"


SessionStatus: TypeAlias = Annotated[
    Union[SessionFailed, SessionCancelled, ClientSessionFinished, SessionActive], Field(discriminator="type")
]


class SessionSummary(WireModel):
    session_id: str
    created_at: datetime
    owner: str
    project_id: str
    status: SessionStatus | None = None
    checkpoints_count: int
    display_name: str | None = None
    user_metadata: dict[str, str] | None = None
    checkpoint_storage_bytes: int | None = None


class SessionSearchResponse(WireModel):
    sessions: list[SessionSummary]
    next_cursor: SessionSearchCursor | None = None


# ---- admin: audit log and billing ---------------------------------------------------------------


class AuditLogEntry(WireModel):
    timestamp: datetime
    event: str
    event_details: dict[str, Any] = Field(default_factory=dict)
    model_id: str | None = None
    tinker_path: str | None = None
    purpose: str | None = None


class AuditLogResponse(WireModel):
    entries: list[AuditLogEntry]


class TrainingBillingEvent(WireModel):
    type: Literal["training"] = "training"
    token_count: int


class SamplingPrefillBillingEvent(WireModel):
    type: Literal["sampling_prefill"] = "sampling_prefill"
    cached: bool
    token_count: int


class SamplingSampleBillingEvent(WireModel):
    type: Literal["sampling_sample"] = "sampling_sample"
    token_count: int


class CheckpointBillingEvent(WireModel):
    type: Literal["checkpoint"] = "checkpoint"
    count: int


class StorageBillingEvent(WireModel):
    type: Literal["storage"] = "storage"
    free: bool = False
    gigabyte_hours: float


BillingEventInfo: TypeAlias = Annotated[
    Union[TrainingBillingEvent, SamplingPrefillBillingEvent, SamplingSampleBillingEvent, CheckpointBillingEvent,
          StorageBillingEvent],
    Field(discriminator="type"),
]


class BillingUsageEvent(WireModel):
    bucket_start: datetime
    bucket_end: datetime
    base_model: str | None = None
    user_id: str | None = None
    user_name: str | None = None
    session_id: str | None = None
    project_id: str | None = None
    estimated_cost_usd: float | None = None
    effective_rate_usd_per_million_tokens: float | None = None
    effective_rate_usd_per_gigabyte_month: float | None = None
    event_info: BillingEventInfo


class BillingUsageSession(WireModel):
    user_metadata: dict[str, str] | None = None


class BillingUsageResponse(WireModel):
    data: list[BillingUsageEvent]
    sessions: dict[str, BillingUsageSession] = Field(default_factory=dict)
    cost_data_through: datetime | None = None


class CurrentCheckpointStorageUsageItem(WireModel):
    project_id: str | None = None
    org_user_urn: str | None = None
    user_email: str | None = None
    user_name: str | None = None
    checkpoint_count: int
    size_bytes: int
    size_gigabytes: float
    estimated_monthly_cost_usd: float | None = None


class CurrentCheckpointStorageUsageResponse(WireModel):
    effective_rate_usd_per_gigabyte_month: float | None = None
    data: list[CurrentCheckpointStorageUsageItem]


# ---- batched completion polling, auth, telemetry (protocol shapes) ------------------------------


class FutureFinished(WireModel):
    state: Literal["finished"] = "finished"
    request_id: str
    response_payload_uncompressed_size: int | None = None


class FutureFailed(WireModel):
    state: Literal["failed"] = "failed"
    request_id: str


FutureCompletion: TypeAlias = Annotated[Union[FutureFinished, FutureFailed], Field(discriminator="state")]


class SamplingSessionFuturesTarget(WireModel):
    type: Literal["sampling_session"] = "sampling_session"
    sampling_session_id: str
    cloned_sampler_id: int = 0


class FuturesRetrieveRequest(WireModel):
    target: SamplingSessionFuturesTarget
    prev_cursor: int = 0
    timeout: float | None = None
    retrieved_request_ids: list[str] = Field(default_factory=list)


class FuturesRetrieveResponse(WireModel):
    completions: list[FutureCompletion]
    cursor: int


class AuthTokenResponse(WireModel):
    jwt: str


class GetBillingUsageRequest(WireModel):
    starting_on: datetime
    ending_before: datetime


class GetCurrentCheckpointStorageUsageRequest(WireModel):
    project_id: str | None = None


EventType: TypeAlias = Literal["SESSION_START", "SESSION_END", "UNHANDLED_EXCEPTION", "GENERIC_EVENT"]
Severity: TypeAlias = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class _TelemetryEventBase(WireModel):
    event: EventType
    event_id: str
    event_session_index: int
    severity: Severity
    timestamp: datetime


class SessionStartEvent(_TelemetryEventBase):
    pass


class SessionEndEvent(_TelemetryEventBase):
    duration: str


class UnhandledExceptionEvent(_TelemetryEventBase):
    error_message: str
    error_type: str
    traceback: str | None = None


class GenericEvent(_TelemetryEventBase):
    event_name: str
    event_data: dict[str, Any] = Field(default_factory=dict)


TelemetryEvent: TypeAlias = Union[SessionStartEvent, SessionEndEvent, UnhandledExceptionEvent, GenericEvent]


class TelemetryBatch(WireModel):
    events: list[TelemetryEvent]
    platform: str
    sdk_version: str
    session_id: str
    process_uuid: str
