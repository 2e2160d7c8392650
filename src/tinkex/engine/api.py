"""The engine's narrow interface: plain dataclasses and numpy arrays in and out.

The server turns wire types into these and back; the engine never sees HTTP, JSON or protobuf.
Everything here is cheap to import (no torch), so the server can build jobs without loading models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

BUILTIN_MODEL = "tinkex/tiny-qwen3"
LORA_ALPHA = 32.0  # fixed, as on the hosted service; the adapter scale is LORA_ALPHA / rank


class EngineError(ValueError):
    """Bad input the caller can fix (unknown model or loss, bad shapes, ids outside the vocabulary).

    The server answers these with a 4xx and the message as `detail`; anything else is a server fault.
    """


@dataclass(frozen=True)
class LossSpec:
    """A built-in loss as the wire sees it: what it reads from each datum's loss_fn_inputs, and the
    loss_fn_config keys it accepts with their defaults. (The formulas: tinkex.engine.losses.)"""

    required: tuple[str, ...]  # target_tokens always
    optional: tuple[str, ...] = ()  # a missing optional input is all ones
    config: Mapping[str, float] = field(default_factory=dict)
    soft_targets: bool = False  # accepts 2-D target_tokens and weights [T, K]


_RL = ("target_tokens", "logprobs", "advantages")
_PPO_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
# GSPO's ratio is a per-token geometric mean over a whole sequence, so it moves far less than a
# token's ratio: the GSPO paper clips it to [1 - 3e-4, 1 + 4e-4], and so do we by default.
_GSPO_CLIP = {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4}
# stable_reinforce caps the importance weight at 2, as truncated importance sampling usually does,
# and adds no KL penalty unless asked to (e.g. {"kl_coeff": 0.01}).
_STABLE = {"clip_high_threshold": 2.0, "kl_coeff": 0.0}

# The one table of loss names, inputs and settings: the server checks each request against it when
# it arrives (a missing input is a 400 at once), and the engine computes with it.
LOSS_INPUTS: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(("target_tokens",), ("weights",), soft_targets=True),
    "importance_sampling": LossSpec(_RL),
    "ppo": LossSpec(_RL, config=_PPO_CLIP),
    "cispo": LossSpec(_RL, config=_PPO_CLIP),
    "dro": LossSpec(_RL, config={"beta": 0.05}),
    "gspo": LossSpec(_RL, ("sequence_ratio_mask",), config=_GSPO_CLIP),
    "stable_reinforce": LossSpec(_RL, config=_STABLE),
}
UNSUPPORTED_LOSSES = ("custom",)  # in the SDK's LossFnType, but not served here


def loss_spec(name: str) -> LossSpec:
    if name in LOSS_INPUTS:
        return LOSS_INPUTS[name]
    served = ", ".join(LOSS_INPUTS)
    if name in UNSUPPORTED_LOSSES:
        raise EngineError(f"unsupported loss {name!r} (this server implements: {served})")
    raise EngineError(f"unknown loss {name!r} (known: {served})")


def resolve_loss_config(name: str, config: Mapping[str, float | str] | None) -> dict[str, float]:
    """The loss_fn_config of loss `name` with defaults filled in. Keys this loss does not use are
    ignored (clients keep one config across losses); a key it uses must be a finite number."""
    spec = loss_spec(name)
    resolved = dict(spec.config)
    for key, value in (config or {}).items():
        if key not in spec.config:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise EngineError(f"loss_fn_config[{key!r}] must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise EngineError(f"loss_fn_config[{key!r}] must be finite, got {value!r}")
        resolved[key] = number
    if "clip_low_threshold" in resolved and resolved["clip_low_threshold"] > resolved["clip_high_threshold"]:
        raise EngineError(f"loss {name!r}: clip_low_threshold must not exceed clip_high_threshold")
    if name == "stable_reinforce":
        if resolved["clip_high_threshold"] <= 0:
            raise EngineError("loss 'stable_reinforce': clip_high_threshold (the cap of the importance weight) "
                              "must be > 0")
        if resolved["kl_coeff"] < 0:
            raise EngineError("loss 'stable_reinforce': kl_coeff must be >= 0")
    return resolved


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
    # int64 [len(prompt) - 1, K]: row i lists tokens whose logprob as token i + 1 of the prompt is
    # wanted (given tokens 0..i); -1 marks an unused cell.
    target_prompt_tokens: np.ndarray | None = field(default=None, compare=False)
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
    target_prompt_logprobs: np.ndarray | None = None  # float32, like target_prompt_tokens; 0.0 in unused cells


class Ready:
    """An answer that is already there: what the in-process engine's `submit_training` returns, where
    a worker pool's returns a reply that waits for its workers. `result()` gives the value."""

    def __init__(self, value: object):
        self.value = value

    def result(self) -> object:
        return self.value
