"""Sampling: parameters, requests and the sampled sequences that come back."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ._api import PromptAltTokens, TopkLogprobs
from ._base import WireModel
from ._model_input import ModelInput
from ._tensor import TensorData

StopReason = Literal["length", "stop"]
TOPK_SENTINEL = (0, -99999.0)  # an empty top-k cell


class SamplingParams(WireModel):
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None  # None: stop at EOS; []: never stop early
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


class CreateSamplingSessionRequest(WireModel):
    session_id: str
    sampling_session_seq_id: int
    base_model: str | None = None
    model_path: str | None = None
    type: Literal["create_sampling_session"] = "create_sampling_session"


class CreateSamplingSessionResponse(WireModel):
    sampling_session_id: str
    type: Literal["create_sampling_session"] = "create_sampling_session"


class SampleRequest(WireModel):
    num_samples: int = 1
    prompt: ModelInput
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    sampling_session_id: str | None = None
    seq_id: int | None = None
    base_model: str | None = None  # legacy addressing, before sampling sessions
    model_path: str | None = None
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: TensorData | None = None
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None
    record_stability_info: bool = False
    type: Literal["sample"] = "sample"


TopkRow = list[tuple[int, float]] | None


class SampledSequence(WireModel):
    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None
    topk_logprobs: list[TopkRow] | None = None
    sequence_id: str | None = None

    @property
    def tokens_np(self) -> np.ndarray:
        return np.asarray(self.tokens, dtype=np.int32)

    @property
    def logprobs_np(self) -> np.ndarray | None:
        return None if self.logprobs is None else np.asarray(self.logprobs, dtype=np.float32)

    @property
    def topk_logprobs_np(self) -> TopkLogprobs | None:
        return None if self.topk_logprobs is None else topk_table(self.topk_logprobs)


class SampleResponse(WireModel):
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[TopkRow] | None = None
    prompt_cache_hit_tokens: int = 0
    target_prompt_logprobs: TensorData | None = None  # float32, the request's layout, 0.0 in unasked cells
    prompt_alt_tokens: PromptAltTokens | None = None
    type: Literal["sample"] | None = None

    @property
    def topk_prompt_logprobs_np(self) -> TopkLogprobs | None:
        return None if self.topk_prompt_logprobs is None else topk_table(self.topk_prompt_logprobs)

    @property
    def prompt_logprobs_np(self) -> np.ndarray | None:
        if self.prompt_logprobs is None:
            return None
        return np.array([np.nan if x is None else x for x in self.prompt_logprobs], dtype=np.float32)


def topk_rows(token_ids: np.ndarray, logprobs: np.ndarray) -> list[TopkRow]:
    """The list view of a top-k table: a row starting with the sentinel is None, trailing sentinels trimmed."""
    rows: list[TopkRow] = []
    for ids, lps in zip(token_ids.tolist(), logprobs.tolist()):
        row = [(int(i), float(lp)) for i, lp in zip(ids, lps)]
        while row and row[-1] == TOPK_SENTINEL:
            row.pop()
        rows.append(row or None)
    return rows


def topk_table(rows: list[TopkRow]) -> TopkLogprobs:
    """The dense view of top-k rows, padded with the sentinel (0, -99999.0)."""
    k = max((len(row or []) for row in rows), default=0)
    ids = np.full((len(rows), k), TOPK_SENTINEL[0], dtype=np.int32)
    lps = np.full((len(rows), k), TOPK_SENTINEL[1], dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate(row or []):
            ids[i, j], lps[i, j] = token, logprob
    return TopkLogprobs(token_ids=ids, logprobs=lps)
