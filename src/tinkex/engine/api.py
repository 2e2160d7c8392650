"""The engine's narrow interface: plain dataclasses and numpy arrays in and out.

The server turns wire types into these and back; the engine never sees HTTP, JSON or protobuf.
Everything here is cheap to import (no torch), so the server can build jobs without loading models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Literal

import numpy as np

BUILTIN_MODEL = "tinkex/tiny-qwen3"
LORA_ALPHA = 32.0  # fixed, as on the hosted service; the adapter scale is LORA_ALPHA / rank


class EngineError(ValueError):
    """Bad input the caller can fix (unknown model or loss, bad shapes, ids outside the vocabulary).

    The server answers these with a 4xx and the message as `detail`; anything else is a server fault.
    """


@dataclass(frozen=True)
class BaseModelInfo:
    name: str  # the name clients use, e.g. "tinkex/tiny-qwen3" or a local directory
    arch: str  # e.g. "Qwen3ForCausalLM"
    tokenizer_id: str  # something `AutoTokenizer.from_pretrained` loads offline on this machine
    vocab_size: int
    max_context_length: int


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


@dataclass
class DatumArrays:
    """One training example: the model input and its loss inputs, next-token aligned.

    Position i of `tokens` predicts `inputs["target_tokens"][i]`.
    """

    tokens: np.ndarray  # int64 [T]
    inputs: dict[str, np.ndarray]  # e.g. target_tokens int64 [T] (or [T, K]), weights float32 [T]


@dataclass
class ForwardBackwardJob:
    adapter_id: str
    data: list[DatumArrays]
    loss_fn: str
    loss_fn_config: dict[str, float | str] = field(default_factory=dict)
    forward_only: bool = False


@dataclass
class ForwardBackwardResult:
    outputs: list[dict[str, np.ndarray]]  # one per datum, at least {"logprobs": float32 like target_tokens}
    metrics: dict[str, float]  # keys are "name:reduction" with exactly one colon; "loss:sum" always


@dataclass(frozen=True)
class AdamHyper:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0  # decoupled (AdamW)
    grad_clip_norm: float = 0.0  # 0 means no clipping


@dataclass
class SampleJob:
    base_model: str
    adapter_id: str | None  # None samples the base model
    prompt: list[int]
    num_samples: int = 1
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 means no limit
    seed: int | None = None  # same seed, same tokens
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None stops at EOS; [] disables every stop, EOS included
    prompt_logprobs: bool = False
    prompt_logprobs_last_n: int | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    # Streaming: called on the engine thread with (sample index, tokens so far) as they are decoded.
    on_tokens: Callable[[int, list[int]], None] | None = field(default=None, repr=False, compare=False)


@dataclass
class SampledSeq:
    tokens: np.ndarray  # int32 [N]
    logprobs: np.ndarray  # float32 [N]
    stop_reason: Literal["stop", "length"]
    topk_token_ids: np.ndarray | None = None  # int32 [N, K]
    topk_logprobs: np.ndarray | None = None  # float32 [N, K]


@dataclass
class SampleResult:
    sequences: list[SampledSeq]
    prompt_logprobs: np.ndarray | None = None  # float32 [len(prompt)], NaN at 0 and where not asked
    topk_prompt_token_ids: np.ndarray | None = None  # int32 [len(prompt), K]; row 0 is the sentinel
    topk_prompt_logprobs: np.ndarray | None = None  # float32 [len(prompt), K]
