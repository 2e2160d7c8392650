"""What goes into the model: token chunks, image chunks, and training examples (Datum)."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, field_serializer, field_validator, model_validator

from ._base import WireModel
from ._tensor import TensorData


class EncodedTextChunk(WireModel):
    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


class _BinaryChunk(WireModel):
    """A chunk carrying raw bytes in Python and base64 in JSON."""

    @field_validator("data", "dmel", mode="before", check_fields=False)
    @classmethod
    def _from_base64(cls, value: Any) -> Any:
        return base64.b64decode(value) if isinstance(value, str) else value

    @field_serializer("data", "dmel", when_used="json", check_fields=False)
    def _to_base64(self, value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")


class ImageChunk(_BinaryChunk):
    data: bytes
    format: Literal["png", "jpeg"]
    expected_tokens: int | None = None
    type: Literal["image"] = "image"

    @property
    def length(self) -> int:
        if self.expected_tokens is None:
            raise ValueError("an ImageChunk's length is its expected_tokens, which is not set")
        return self.expected_tokens


class ImageAssetPointerChunk(WireModel):
    format: Literal["png", "jpeg"]
    location: str
    expected_tokens: int | None = None
    type: Literal["image_asset_pointer"] = "image_asset_pointer"

    @property
    def length(self) -> int:
        if self.expected_tokens is None:
            raise ValueError("an ImageAssetPointerChunk's length is its expected_tokens, which is not set")
        return self.expected_tokens


class DmelChunk(_BinaryChunk):
    dmel: bytes
    type: Literal["dmel"] = "dmel"

    @property
    def length(self) -> int:
        return _tensor_container_rows(self.dmel)


def _tensor_container_rows(blob: bytes) -> int:
    """Dimension 0 of a serialized TensorContainer: [0xFE]? dtype-byte varint(ndim) varint(dims)..."""
    pos = 1 if blob[:1] == b"\xfe" else 0
    pos += 1  # dtype byte

    def varint() -> int:
        nonlocal pos
        shift = value = 0
        while True:
            byte = blob[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    ndim = varint()
    return varint() if ndim else 1


ModelInputChunk = Annotated[
    EncodedTextChunk | ImageChunk | ImageAssetPointerChunk | DmelChunk, Field(discriminator="type")
]


class ModelInput(WireModel):
    chunks: list[ModelInputChunk] = Field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: list[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=list(tokens))])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        tokens: list[int] = []
        for chunk in self.chunks:
            if not isinstance(chunk, EncodedTextChunk):
                raise ValueError(f"to_ints() needs text chunks only, found a {chunk.type} chunk")
            tokens.extend(chunk.tokens)
        return tokens

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: Any) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        if self.chunks and isinstance(self.chunks[-1], EncodedTextChunk):
            last = self.chunks[-1]
            return ModelInput(chunks=[*self.chunks[:-1], EncodedTextChunk(tokens=[*last.tokens, token])])
        return self.append(EncodedTextChunk(tokens=[token]))


class PromptProvenanceSpan(WireModel):
    sequence_id: str = Field(min_length=1)
    offset: int = Field(default=0, ge=0)
    length: int = Field(ge=0)
    type: Literal["prompt_tokens"] = "prompt_tokens"


class SampledProvenanceSpan(WireModel):
    sequence_id: str = Field(min_length=1)
    offset: int = Field(default=0, ge=0)
    length: int = Field(ge=0)
    type: Literal["sampled_tokens"] = "sampled_tokens"


ProvenanceSpan = Annotated[PromptProvenanceSpan | SampledProvenanceSpan, Field(discriminator="type")]

# Python lists have no dtype of their own; these keys say which one they mean.
_LIST_DTYPES = {
    "target_tokens": np.int64,
    "weights": np.float32,
    "advantages": np.float32,
    "logprobs": np.float32,
    "clip_low_threshold": np.float32,
    "clip_high_threshold": np.float32,
    "sequence_ratio_mask": np.float32,
}
_SPARSE_KEYS = {"target_tokens", "weights"}


def as_tensor_data(key: str, value: Any) -> TensorData:
    """Coerce a loss input (TensorData, numpy, torch or a list under a known key) to TensorData."""
    if isinstance(value, TensorData):
        return value
    if isinstance(value, dict):
        return TensorData.model_validate(value)
    if isinstance(value, np.ndarray):
        if key in _SPARSE_KEYS and value.ndim == 2:
            return TensorData.from_numpy_sparse(value)
        return TensorData.from_numpy(value)
    if type(value).__module__.startswith("torch"):
        if key in _SPARSE_KEYS and value.ndim == 2:
            return TensorData.from_torch_sparse(value)
        return TensorData.from_torch(value)
    if isinstance(value, (list, tuple)):
        if key not in _LIST_DTYPES:
            raise KeyError(f"loss input {key!r} given as a list: pass a numpy array, torch tensor or TensorData")
        return TensorData.from_numpy(np.asarray(value, dtype=_LIST_DTYPES[key]))
    raise TypeError(f"loss input {key!r} has unsupported type {type(value).__name__}")


class Datum(WireModel):
    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)
    model_input_spans: list[ProvenanceSpan] | None = None
    loss_fn_input_spans: list[ProvenanceSpan] | None = None

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _coerce_inputs(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: as_tensor_data(key, item) for key, item in value.items()}
        return value

    @model_validator(mode="after")
    def _spans_pair(self) -> Datum:
        if (self.model_input_spans is None) != (self.loss_fn_input_spans is None):
            raise ValueError("provenance comes as a pair: set both span lists or neither")
        return self

    def with_provenance(self, model_input: list[Any], loss_fn_inputs: list[Any]) -> Datum:
        _check_tiling("model_input", model_input, self.model_input.length)
        targets = self.loss_fn_inputs.get("target_tokens")
        if targets is not None and targets.shape is not None and len(targets.shape) == 1:
            _check_tiling("loss_fn_inputs", loss_fn_inputs, targets.shape[0])
        return self.model_copy(update={"model_input_spans": list(model_input),
                                       "loss_fn_input_spans": list(loss_fn_inputs)})


def _check_tiling(name: str, spans: list[Any], expected: int) -> None:
    total = sum(span.length for span in spans)
    if total != expected:
        raise ValueError(f"{name} spans cover {total} positions but the field has {expected}")
