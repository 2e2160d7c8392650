"""Wire types to engine jobs and engine results back to wire types, with the input checks in between.

Every check here runs when a request arrives, so bad input is answered with a 400 at once instead
of failing later inside the engine.
"""

from __future__ import annotations

import math

import numpy as np

from tinkex.engine.api import (
    BaseModelInfo,
    DatumArrays,
    EngineError,
    ForwardBackwardResult,
    SampleJob,
    SampleResult,
    loss_spec,
    resolve_loss_config,
)
from tinkex.types import (
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    SampledSequence,
    SampleRequest,
    SampleResponse,
    TensorData,
    topk_rows,
)

MAX_SAMPLES = 128
DEFAULT_MAX_TOKENS = 128


class InputError(ValueError):
    """A request that can never succeed as sent; answered with 400 and this message."""


def _tokens(chunks: list, what: str) -> np.ndarray:
    tokens: list[int] = []
    for chunk in chunks:
        if not isinstance(chunk, EncodedTextChunk):
            raise InputError(f"{what}: this server's models take text tokens only, not {chunk.type} chunks")
        tokens.extend(chunk.tokens)
    return np.asarray(tokens, dtype=np.int64)


def _check_ids(tokens: np.ndarray, info: BaseModelInfo, what: str) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= info.vocab_size):
        bad = int(tokens[(tokens < 0) | (tokens >= info.vocab_size)][0])
        raise InputError(f"{what}: token id {bad} is outside the vocabulary of {info.name} (0..{info.vocab_size - 1})")


def datum_arrays(datum: Datum, index: int, loss_fn: str, info: BaseModelInfo) -> DatumArrays:
    what = f"datum {index}"
    tokens = _tokens(datum.model_input.chunks, what)
    if tokens.size == 0:
        raise InputError(f"{what}: model_input is empty")
    if tokens.size > info.max_context_length:
        raise InputError(f"{what}: {tokens.size} tokens exceed the context of {info.name} ({info.max_context_length})")
    _check_ids(tokens, info, what)
    missing = [key for key in loss_spec(loss_fn).required if key not in datum.loss_fn_inputs]
    if missing:
        raise InputError(f"{what}: loss {loss_fn!r} needs loss_fn_inputs {', '.join(map(repr, missing))} "
                         f"(it has {', '.join(map(repr, datum.loss_fn_inputs)) or 'none'})")
    inputs: dict[str, np.ndarray] = {}
    for key, tensor in datum.loss_fn_inputs.items():
        array = tensor.to_numpy()
        if array.ndim == 0 or array.shape[0] != tokens.size:
            raise InputError(f"{what}: loss_fn_inputs[{key!r}] has shape {list(array.shape)}, "
                             f"but the model input has {tokens.size} tokens")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InputError(f"{what}: loss_fn_inputs[{key!r}] contains NaN or infinity")
        inputs[key] = array
    targets = inputs.get("target_tokens")
    if targets is not None:
        if targets.dtype.kind != "i":
            raise InputError(f"{what}: target_tokens must be int64")
        _check_ids(targets, info, f"{what} target_tokens")
        spec = loss_spec(loss_fn)
        if targets.ndim != 1 and not (spec.soft_targets and targets.ndim == 2):
            raise InputError(f"{what}: target_tokens must be 1-D for loss {loss_fn!r}, got shape {list(targets.shape)}")
        for key in (*spec.required, *spec.optional):
            if key != "target_tokens" and key in inputs and inputs[key].shape != targets.shape:
                raise InputError(f"{what}: {key} shape {list(inputs[key].shape)} differs from target_tokens "
                                 f"shape {list(targets.shape)}")
    return DatumArrays(tokens=tokens, inputs=inputs)


def check_loss(loss_fn: str, config: dict[str, float | str] | None) -> None:
    """The loss exists here and its loss_fn_config is valid (the table is the engine's, so the two agree)."""
    try:
        resolve_loss_config(loss_fn, config)
    except EngineError as exc:
        raise InputError(str(exc)) from None


def forward_backward_output(result: ForwardBackwardResult) -> ForwardBackwardOutput:
    return ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[{key: TensorData.from_numpy(value) for key, value in out.items()} for out in result.outputs],
        metrics={key: float(value) for key, value in result.metrics.items()},
    )


def sample_job(request: SampleRequest, info: BaseModelInfo, adapter_id: str | None) -> SampleJob:
    params = request.sampling_params
    prompt = _tokens(request.prompt.chunks, "prompt")
    if prompt.size == 0:
        raise InputError("prompt is empty")
    _check_ids(prompt, info, "prompt")
    if not 1 <= request.num_samples <= MAX_SAMPLES:
        raise InputError(f"num_samples must be between 1 and {MAX_SAMPLES}, not {request.num_samples}")
    max_tokens = DEFAULT_MAX_TOKENS if params.max_tokens is None else params.max_tokens
    if max_tokens < 0:
        raise InputError("max_tokens must be >= 0")
    max_tokens = min(max_tokens, info.max_context_length - int(prompt.size))
    if max_tokens < 0:
        raise InputError(f"the prompt ({prompt.size} tokens) exceeds the context of {info.name} "
                         f"({info.max_context_length})")
    if not (params.temperature >= 0 and math.isfinite(params.temperature)):
        raise InputError("temperature must be a finite number >= 0")
    if not 0 < params.top_p <= 1:
        raise InputError("top_p must be in (0, 1]")
    if params.top_k == 0 or params.top_k < -1:
        raise InputError("top_k must be -1 (no limit) or >= 1")
    if request.prompt_logprobs_last_n is not None and request.prompt_logprobs_last_n < 1:
        raise InputError("prompt_logprobs_last_n must be >= 1")
    for name in ("topk_prompt_logprobs", "topk_sample_logprobs"):
        if not 0 <= getattr(request, name) <= 64:
            raise InputError(f"{name} must be between 0 and 64")
    stop = params.stop
    stop_strings: list[str] = []
    stop_ids: list[int] | None = None
    if isinstance(stop, str):
        stop_strings = [stop]
    elif isinstance(stop, list) and not stop:
        stop_ids = []
    elif isinstance(stop, list) and isinstance(stop[0], str):
        stop_strings = list(stop)
    elif isinstance(stop, list):
        stop_ids = [int(t) for t in stop]
        _check_ids(np.asarray(stop_ids), info, "stop")
    targets = _target_prompt_tokens(request.target_prompt_logprobs, prompt.size, info)
    seed = None if params.seed is None else params.seed % (2**63)
    return SampleJob(
        base_model=info.name, adapter_id=adapter_id, prompt=prompt.tolist(), num_samples=request.num_samples,
        max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=seed,
        stop_strings=stop_strings, stop_token_ids=stop_ids,
        prompt_logprobs=request.prompt_logprobs or request.topk_prompt_logprobs > 0,
        prompt_logprobs_last_n=request.prompt_logprobs_last_n,
        topk_prompt_logprobs=request.topk_prompt_logprobs, topk_sample_logprobs=request.topk_sample_logprobs,
        target_prompt_tokens=targets,
    )


def _target_prompt_tokens(tensor: TensorData | None, prompt_length: int, info: BaseModelInfo) -> np.ndarray | None:
    """target_prompt_logprobs of a request: int64 [len(prompt) - 1, K], -1 (or a cell a sparse tensor
    leaves out) meaning "nothing asked here"."""
    if tensor is None:
        return None
    if tensor.dtype != "int64":
        raise InputError(f"target_prompt_logprobs must be int64 token ids, not {tensor.dtype}")
    if tensor.shape is None or len(tensor.shape) != 2 or tensor.shape[0] != prompt_length - 1:
        raise InputError(f"target_prompt_logprobs must have shape [len(prompt) - 1, K] = [{prompt_length - 1}, K], "
                         f"not {tensor.shape}")
    try:
        array = tensor.to_numpy(pad_value=-1)
    except (ValueError, IndexError) as exc:
        raise InputError(f"target_prompt_logprobs is not a valid tensor: {exc}") from None
    bad = array[(array < -1) | (array >= info.vocab_size)]
    if bad.size:
        raise InputError(f"target_prompt_logprobs: token id {int(bad[0])} is outside the vocabulary of {info.name} "
                         f"(0..{info.vocab_size - 1}; -1 marks an unused cell)")
    return array


def sample_response(result: SampleResult, request: SampleRequest) -> SampleResponse:
    sequences = [
        SampledSequence(
            stop_reason=seq.stop_reason,
            tokens=seq.tokens.tolist(),
            logprobs=seq.logprobs.tolist(),
            topk_logprobs=topk_rows(seq.topk_token_ids, seq.topk_logprobs) if seq.topk_token_ids is not None else None,
        )
        for seq in result.sequences
    ]
    prompt_logprobs = None
    if request.prompt_logprobs and result.prompt_logprobs is not None:
        prompt_logprobs = [None if math.isnan(x) else x for x in result.prompt_logprobs.tolist()]
    topk_prompt = None
    if request.topk_prompt_logprobs and result.topk_prompt_token_ids is not None:
        topk_prompt = topk_rows(result.topk_prompt_token_ids, result.topk_prompt_logprobs)
    target = None
    if request.target_prompt_logprobs is not None and result.target_prompt_logprobs is not None:
        target = _like(request.target_prompt_logprobs, result.target_prompt_logprobs)
    return SampleResponse(sequences=sequences, prompt_logprobs=prompt_logprobs, topk_prompt_logprobs=topk_prompt,
                          target_prompt_logprobs=target)


def _like(layout: TensorData, values: np.ndarray) -> TensorData:
    """float32 `values` in the layout of the request's tensor: sparse cells where it was sparse."""
    if not layout.is_sparse:
        return TensorData.from_numpy(values.astype(np.float32))
    rows = np.repeat(np.arange(values.shape[0]), np.diff(np.asarray(layout.sparse_crow_indices, np.int64)))
    cells = values[rows, np.asarray(layout.sparse_col_indices, np.int64)]
    return TensorData(data=cells.astype(np.float32).tolist(), dtype="float32", shape=list(values.shape),
                      sparse_crow_indices=list(layout.sparse_crow_indices),
                      sparse_col_indices=list(layout.sparse_col_indices))
