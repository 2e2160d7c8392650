"""Splitting forward_backward batches into request-sized chunks, and merging the chunk results.

A chunk ends when it holds `max_len` datums or when the next datum would push its estimated proto
size past `max_bytes`. Results are concatenated in chunk order; metrics are merged by the
reduction named after the last `:` of each key (`name:reduction`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ..types import (
    Datum,
    DmelChunk,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ImageAssetPointerChunk,
    ImageChunk,
    TensorData,
)

logger = logging.getLogger("tinkex")


def tensor_bytes(tensor: TensorData) -> int:
    itemsize = 8 if tensor.dtype == "int64" else 4
    size = len(tensor.data) * itemsize
    if tensor.sparse_crow_indices is not None:
        size += 8 * (len(tensor.sparse_crow_indices) + len(tensor.sparse_col_indices or []))
    return size


def datum_bytes(datum: Datum) -> int:
    """The estimated proto size of a datum: 4 bytes a token, raw media bytes, tensor bytes."""
    size = 0
    for chunk in datum.model_input.chunks:
        if isinstance(chunk, EncodedTextChunk):
            size += 4 * len(chunk.tokens)
        elif isinstance(chunk, ImageChunk):
            size += len(chunk.data)
        elif isinstance(chunk, DmelChunk):
            size += len(chunk.dmel)
        elif isinstance(chunk, ImageAssetPointerChunk):
            size += len(chunk.location)
    for tensor in datum.loss_fn_inputs.values():
        size += tensor_bytes(tensor)
    return size


def chunk_data(data: Sequence[Datum], max_len: int = 1024, max_bytes: int = 5_000_000) -> list[list[Datum]]:
    """Split data in order; every chunk has at least one datum."""
    chunks: list[list[Datum]] = []
    current: list[Datum] = []
    current_bytes = 0
    for datum in data:
        size = datum_bytes(datum)
        if current and (len(current) >= max_len or current_bytes + size > max_bytes):
            chunks.append(current)
            current, current_bytes = [], 0
        current.append(datum)
        current_bytes += size
    if current:
        chunks.append(current)
    return chunks


def _weighted_mean(values: list[float], weights: list[float]) -> float:
    if sum(weights) <= 0:
        return float(np.mean(values))
    return float(np.average(values, weights=weights))


def merge_metrics(results: Sequence[ForwardBackwardOutput]) -> dict[str, float]:
    """Combine per-chunk metrics by reduction suffix, weighting means by each chunk's datum count.

    Reductions: mean, sum, min, max, slack (max - weighted mean), hash2 (uint64 sum, wrapping) and
    unique (the first value, then `key_1`, `key_2`, ... for the others). Keys with an unknown
    reduction, or missing from some chunk, are dropped.
    """
    if not results:
        return {}
    weights = [float(len(result.loss_fn_outputs)) for result in results]
    merged: dict[str, float] = {}
    for key in results[0].metrics:
        name, sep, reduction = key.rpartition(":")
        if not sep or not name:
            logger.debug("dropping metric %r: it has no `name:reduction` form", key)
            continue
        if not all(key in result.metrics for result in results):
            continue
        values = [float(result.metrics[key]) for result in results]
        if reduction == "mean":
            merged[key] = _weighted_mean(values, weights)
        elif reduction == "sum":
            merged[key] = float(np.sum(values))
        elif reduction == "min":
            merged[key] = float(np.min(values))
        elif reduction == "max":
            merged[key] = float(np.max(values))
        elif reduction == "slack":
            merged[key] = float(np.max(values)) - _weighted_mean(values, weights)
        elif reduction == "hash2":
            mask = 0xFFFF_FFFF_FFFF_FFFF
            merged[key] = float(sum(int(v) & mask for v in values) & mask)
        elif reduction == "unique":
            merged[key] = values[0]
            for i, value in enumerate(values[1:], start=1):
                merged[f"{key}_{i}"] = value
        else:
            logger.debug("dropping metric %r: unknown reduction %r", key, reduction)
    return merged


def combine_outputs(results: Sequence[ForwardBackwardOutput]) -> ForwardBackwardOutput:
    if not results:
        return ForwardBackwardOutput(loss_fn_output_type="", loss_fn_outputs=[], metrics={})
    return ForwardBackwardOutput(
        loss_fn_output_type=results[0].loss_fn_output_type,
        loss_fn_outputs=[output for result in results for output in result.loss_fn_outputs],
        metrics=merge_metrics(results),
    )
