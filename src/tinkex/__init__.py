"""tinkex: a Tinker-compatible fine-tuning SDK, local server and cookbook.

Port a program written for the official `tinker` SDK by changing `import tinker` to
`import tinkex as tinker`. With no TINKER_BASE_URL and no API key, the SDK starts the embedded
tinkex server on loopback.
"""

from typing import Any, TypedDict

import httpx as _httpx

from . import types
from .client import (
    AdminClient,
    APIFuture,
    BackcompatSamplingClientFuture,
    BackcompatTrainingClientFuture,
    ExperimentalWarning,
    LossHandle,
    PerDatumLossFn,
    RestClient,
    RetryConfig,
    SamplingClient,
    ServiceClient,
    TrainingClient,
    auth,
)
from .client._constants import TINKEX_VERSION as __version__
from .types import (
    AdamOptimizerConfig,
    AdamParams,
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BillingError,
    Checkpoint,
    CheckpointType,
    ConflictError,
    Datum,
    DimuonOptimizerConfig,
    DimuonParams,
    DmelChunk,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ImageAssetPointerChunk,
    ImageChunk,
    InternalServerError,
    LoraConfig,
    ModelID,
    ModelInput,
    ModelInputChunk,
    NotFoundError,
    OptimParams,
    OptimStepRequest,
    OptimStepResponse,
    ParsedCheckpointTinkerPath,
    PermissionDeniedError,
    PromptProvenanceSpan,
    RateLimitError,
    RequestFailedError,
    SampledProvenanceSpan,
    SampledSequence,
    SampleRequest,
    SampleResponse,
    SamplingParams,
    StopReason,
    TensorData,
    TensorDtype,
    TinkerError,
    TrainingRun,
    UnprocessableEntityError,
)

__title__ = "tinkex"

Timeout = _httpx.Timeout


class RequestOptions(TypedDict, total=False):
    """Per-request options (accepted for compatibility; the clients set their own)."""

    headers: dict[str, str]
    max_retries: int
    timeout: float | _httpx.Timeout | None
    params: dict[str, Any]
    extra_json: dict[str, Any]
    idempotency_key: str


__all__ = [
    "TrainingClient", "BackcompatTrainingClientFuture", "ServiceClient", "SamplingClient",
    "BackcompatSamplingClientFuture", "RestClient", "AdminClient", "APIFuture", "LossHandle", "PerDatumLossFn",
    "RetryConfig", "auth",
    "AdamOptimizerConfig", "AdamParams", "DimuonOptimizerConfig", "DimuonParams", "OptimParams", "Checkpoint",
    "CheckpointType", "Datum", "DmelChunk", "EncodedTextChunk", "ImageChunk", "ImageAssetPointerChunk",
    "ForwardBackwardOutput", "SampledProvenanceSpan", "LoraConfig", "ModelID", "ModelInput", "ModelInputChunk",
    "OptimStepRequest", "OptimStepResponse", "ParsedCheckpointTinkerPath", "PromptProvenanceSpan", "SampledSequence",
    "SampleRequest", "SampleResponse", "SamplingParams", "StopReason", "TensorData", "TensorDtype", "TrainingRun",
    "Timeout", "RequestOptions",
    "TinkerError", "APIError", "APIStatusError", "APITimeoutError", "APIConnectionError",
    "APIResponseValidationError", "RequestFailedError", "BadRequestError", "AuthenticationError", "BillingError",
    "PermissionDeniedError", "NotFoundError", "ConflictError", "UnprocessableEntityError", "RateLimitError",
    "InternalServerError",
    "ExperimentalWarning",
    "types",
    "__version__", "__title__",
]
