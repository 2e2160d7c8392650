"""Training: models, LoRA and optimizer settings, forward/backward, optimizer steps, weights."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from ._base import WireModel
from ._model_input import Datum
from ._tensor import TensorData

LossFnType = Literal[
    "cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce", "custom"
]
SamplingClientKind = Literal["snapshot", "inflight"]


class LoraConfig(WireModel):
    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class AdamOptimizerConfig(WireModel):
    type: Literal["adamw"] = "adamw"


class AdamParams(WireModel):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
    type: Literal["adam"] | None = None  # never sent by the SDK; accepted when a peer sends it

    @field_validator("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class CreateModelRequest(WireModel):
    session_id: str
    model_seq_id: int
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfig = Field(default_factory=LoraConfig)
    optimizer_config: dict[str, Any] | None = None
    type: Literal["create_model"] = "create_model"


class CreateModelResponse(WireModel):
    model_id: str
    type: Literal["create_model"] = "create_model"


class GetInfoRequest(WireModel):
    model_id: str
    type: Literal["get_info"] = "get_info"


class ModelData(WireModel):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(WireModel):
    type: Literal["get_info"] | None = "get_info"
    model_data: ModelData
    model_id: str
    optimizer_config: dict[str, Any] | None = None
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None


class ForwardBackwardInput(WireModel):
    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float | str] | None = None


class ForwardBackwardRequest(WireModel):
    """A forward_backward call. On the wire it is protobuf since SDK 0.25; JSON before."""

    forward_backward_input: ForwardBackwardInput
    model_id: str
    seq_id: int
    forward_only: bool = False


class ForwardRequest(WireModel):
    """The /forward endpoint of SDKs before 0.25."""

    forward_input: ForwardBackwardInput
    model_id: str
    seq_id: int


class ForwardBackwardOutput(WireModel):
    loss_fn_output_type: str = "ArrayRecord"
    loss_fn_outputs: list[dict[str, TensorData]] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)


class OptimStepRequest(WireModel):
    model_id: str
    seq_id: int
    adam_params: AdamParams = Field(validation_alias=AliasChoices("adam_params", "optim_params", "optimizer_params"))
    type: Literal["optim_step"] = "optim_step"

    @model_validator(mode="before")
    @classmethod
    def _only_adam(cls, values: Any) -> Any:
        if isinstance(values, dict):
            params = values.get("adam_params") or values.get("optim_params") or values.get("optimizer_params")
            if isinstance(params, dict) and params.get("type") not in (None, "adam", "adamw"):
                raise ValueError(f"optimizer {params.get('type')!r} is not supported; this server runs AdamW")
        return values


class OptimStepResponse(WireModel):
    metrics: dict[str, float] | None = None


class SaveWeightsRequest(WireModel):
    model_id: str
    path: str | None = None
    seq_id: int | None = None
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, Any] | None = None
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsResponse(WireModel):
    path: str
    type: Literal["save_weights"] | None = None


class SaveWeightsForSamplerRequest(WireModel):
    model_id: str
    path: str | None = None
    kind: SamplingClientKind | None = None
    sampling_session_seq_id: int | None = None
    seq_id: int | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, Any] | None = None
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"


class SaveWeightsForSamplerResponse(WireModel):
    path: str | None = None
    sampling_session_id: str | None = None
    type: Literal["save_weights_for_sampler"] | None = None


class LoadWeightsRequest(WireModel):
    """Either a new model made from a checkpoint (session addressing) or a load into an existing one."""

    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    optimizer_config: dict[str, Any] | None = None
    weights_access_token: str | None = None
    type: Literal["load_weights"] = "load_weights"


class LoadWeightsResponse(WireModel):
    path: str | None = None
    model_id: str | None = None
    type: Literal["load_weights"] | None = None


class UnloadModelRequest(WireModel):
    model_id: str
    type: Literal["unload_model"] = "unload_model"


class UnloadModelResponse(WireModel):
    model_id: str
    type: Literal["unload_model"] | None = None
