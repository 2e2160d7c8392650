"""REST resources: capabilities, training runs, checkpoints, sessions, samplers and tinker paths."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from ._base import WireModel

CheckpointType = Literal["training", "sampler", "external"]
_SEGMENT_TYPES: dict[str, CheckpointType] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}
SEGMENTS: dict[CheckpointType, str] = {kind: segment for segment, kind in _SEGMENT_TYPES.items()}


class ParsedCheckpointTinkerPath(WireModel):
    """`tinker://{training_run_id}/{segment}/{name}`; checkpoint_id is `{segment}/{name}`."""

    tinker_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str

    @property
    def name(self) -> str:
        return self.checkpoint_id.split("/", 1)[1]

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> ParsedCheckpointTinkerPath:
        if not tinker_path.startswith("tinker://"):
            raise ValueError(f"not a tinker path (must start with tinker://): {tinker_path!r}")
        parts = tinker_path[len("tinker://"):].split("/")
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"a tinker path is tinker://<run>/<segment>/<name>: {tinker_path!r}")
        run_id, segment, name = parts
        if segment not in _SEGMENT_TYPES:
            raise ValueError(f"unknown checkpoint segment {segment!r} in {tinker_path!r}")
        return cls(tinker_path=tinker_path, training_run_id=run_id,
                   checkpoint_type=_SEGMENT_TYPES[segment], checkpoint_id=f"{segment}/{name}")


def tinker_path(training_run_id: str, checkpoint_type: CheckpointType, name: str) -> str:
    return f"tinker://{training_run_id}/{SEGMENTS[checkpoint_type]}/{name}"


class SupportedModel(WireModel):
    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


class GetServerCapabilitiesResponse(WireModel):
    supported_models: list[SupportedModel]


class HealthResponse(WireModel):
    status: Literal["ok"] = "ok"


class Cursor(WireModel):
    offset: int
    limit: int
    total_count: int


class Checkpoint(WireModel):
    checkpoint_id: str
    checkpoint_type: CheckpointType
    time: datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, Any] | None = None
    expires_at: datetime | None = None


class CheckpointsListResponse(WireModel):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class TrainingRun(WireModel):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, Any] | None = None


class TrainingRunsResponse(WireModel):
    training_runs: list[TrainingRun]
    cursor: Cursor


class WeightsInfoRequest(WireModel):
    tinker_path: str


class WeightsInfoResponse(WireModel):
    base_model: str
    optimizer_config: dict[str, Any] = Field(default_factory=lambda: {"type": "adamw"})
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


class CheckpointTtlRequest(WireModel):
    ttl_seconds: int | None = None


class GetSessionResponse(WireModel):
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, Any] | None = None
    display_name: str | None = None


class ListSessionsResponse(WireModel):
    sessions: list[str]


class GetSamplerResponse(WireModel):
    sampler_id: str
    base_model: str
    model_path: str | None = None


class CheckpointArchiveUrlResponse(WireModel):
    url: str
    expires: datetime | None = None
