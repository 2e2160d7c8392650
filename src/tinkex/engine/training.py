"""forward_backward: validate each job, then run all jobs of one base model as ONE padded batch.

Layout of a batch: datums are rows, right-padded to the longest; rows are ordered by adapter, so
each adapter owns a contiguous block of rows (lora.Routing). No attention mask is needed: with
right padding and causal attention a real token never sees a pad. The lm_head keeps only the real
positions, so logits are [N, vocab] for the N real tokens, flattened in row order; each job and
each datum is then a contiguous range of those N positions.

Positions whose loss gradient is zero by construction (weight or advantage 0: prompt tokens) get
their logprobs from a pass through the head without gradient; the backward through the head and the
[N, vocab] logits covers the other positions only (_gated_target_logprobs).

Calls too big for one forward (see MAX_BATCH_TOKENS) run as a few micro-batches instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import decode, lora, losses
from .api import DatumArrays, EngineError, ForwardBackwardJob, ForwardBackwardResult, resolve_loss_config
from .models import BaseModel


@dataclass
class PreparedJob:
    """A validated job: its datums' tokens and its loss inputs flattened over datums."""

    index: int  # position in the caller's list
    job: ForwardBackwardJob
    loss: losses.LossDef
    config: dict[str, float]
    tokens: list[np.ndarray]  # int64 [T_i] per datum
    targets: np.ndarray  # int64 [N] or [N, K]
    inputs: dict[str, np.ndarray]  # float32 [N] or [N, K]
    train: bool

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def piece(self, first: int, stop: int) -> PreparedJob:
        """Datums first..stop-1 of this job (for splitting a call that is too big for one forward)."""
        if (first, stop) == (0, len(self.tokens)):
            return self
        bounds = np.concatenate([[0], np.cumsum(self.lengths)])
        lo, hi = bounds[first], bounds[stop]
        return PreparedJob(self.index, self.job, self.loss, self.config, self.tokens[first:stop],
                           self.targets[lo:hi], {k: v[lo:hi] for k, v in self.inputs.items()}, self.train)


def prepare(index: int, job: ForwardBackwardJob, base: BaseModel, *, trainable: bool) -> PreparedJob:
    """Check everything a job brings; raise EngineError saying exactly what is wrong."""
    loss = losses.lookup(job.loss_fn)
    config = resolve_loss_config(job.loss_fn, job.loss_fn_config)
    if not job.forward_only and not trainable:
        raise EngineError(f"adapter {job.adapter_id!r} was loaded for sampling only and cannot be trained")
    info = base.info
    tokens, targets, inputs = [], [], {name: [] for name in loss.required + loss.optional}
    for i, datum in enumerate(job.data):
        where = f"datum {i}"
        seq = _int_array(datum.tokens, f"{where}: tokens")
        if seq.ndim != 1 or len(seq) == 0:
            raise EngineError(f"{where}: tokens must be a non-empty 1-D array, got shape {tuple(seq.shape)}")
        if len(seq) > info.max_context_length:
            raise EngineError(f"{where}: {len(seq)} tokens exceed the model's context of {info.max_context_length}")
        _check_ids(seq, info.vocab_size, f"{where}: tokens")
        target = _target_array(datum, loss, job.loss_fn, where)
        if target.shape[0] != len(seq):
            raise EngineError(f"{where}: target_tokens has length {target.shape[0]} but tokens has {len(seq)}")
        _check_ids(target, info.vocab_size, f"{where}: target_tokens")
        for name in inputs:
            inputs[name].append(_float_input(datum, name, target.shape, where, required=name in loss.required))
        tokens.append(seq)
        targets.append(target)
    if targets and len({t.ndim for t in targets}) > 1:
        raise EngineError("target_tokens must be 1-D in every datum or 2-D in every datum of a job")
    if targets and len({t.shape[1:] for t in targets}) > 1:
        raise EngineError("2-D target_tokens [T, K] must have the same K in every datum of a job, got "
                          f"K = {sorted({t.shape[1] for t in targets})}")
    flat = {name: _concat(parts, np.float32) for name, parts in inputs.items()}
    return PreparedJob(index, job, loss, config, tokens, _concat(targets, np.int64), flat, train=not job.forward_only)


def _int_array(value, what: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise EngineError(f"{what} must be integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids[(ids < 0) | (ids >= vocab_size)].flat[0])
        raise EngineError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab_size})")


def _target_array(datum: DatumArrays, loss: losses.LossDef, loss_name: str, where: str) -> np.ndarray:
    if "target_tokens" not in datum.inputs:
        raise EngineError(f"{where}: loss {loss_name!r} needs input 'target_tokens'")
    target = _int_array(datum.inputs["target_tokens"], f"{where}: target_tokens")
    allowed = (1, 2) if loss.soft_targets else (1,)
    if target.ndim not in allowed or (target.ndim == 2 and target.shape[1] == 0):
        shapes = "[T] or [T, K]" if loss.soft_targets else "[T]"
        raise EngineError(f"{where}: target_tokens must have shape {shapes} for loss {loss_name!r}, "
                          f"got {tuple(target.shape)}")
    return target


def _float_input(datum: DatumArrays, name: str, shape: tuple[int, ...], where: str, *, required: bool) -> np.ndarray:
    if name not in datum.inputs:
        if required:
            raise EngineError(f"{where}: this loss needs input {name!r}")
        return np.ones(shape, np.float32)  # an optional input (weights, sequence_ratio_mask) missing means all ones
    array = np.asarray(datum.inputs[name])
    if array.dtype.kind not in "fiu":
        raise EngineError(f"{where}: {name} must be numbers, got dtype {array.dtype}")
    if array.shape != shape:
        raise EngineError(f"{where}: {name} has shape {tuple(array.shape)} but target_tokens has {tuple(shape)}")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise EngineError(f"{where}: {name} contains NaN or infinity")
    return array


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


# One forward holds at most this many padded tokens, and this many logits (kept positions x vocab;
# the float32 logits and their log-softmax then take ~2 GiB). Larger calls run as several micro-
# batches, each with its own backward: the losses are sums over datums, so the accumulated
# gradient is the same as from one big batch.
MAX_BATCH_TOKENS = 1 << 16
MAX_LOGIT_ELEMENTS = 1 << 28


def run(base: BaseModel, jobs: list[PreparedJob]) -> dict[int, ForwardBackwardResult]:
    """Forward all jobs together, backward the training jobs' summed losses; results by job index.

    Gradients accumulate in the adapters' tensors until their optimizer step."""
    jobs = sorted(jobs, key=lambda j: j.job.adapter_id)  # stable: an adapter's rows are contiguous
    parts: dict[int, list[tuple[np.ndarray, float, dict[str, float], int]]] = {job.index: [] for job in jobs}
    for batch in _micro_batches(jobs, base.info.vocab_size):
        for index, part in _run_batch(base, batch).items():
            parts[index].append(part)
    return {job.index: _merge(job, parts[job.index]) for job in jobs}


def _micro_batches(jobs: list[PreparedJob], vocab_size: int):
    """Lists of job pieces (whole jobs where they fit) that respect the memory limits."""
    batch, rows, width, tokens = [], 0, 0, 0
    for job in jobs:
        first = 0
        for d, n in enumerate(job.lengths):
            fits = (rows + 1) * max(width, n) <= MAX_BATCH_TOKENS and (tokens + n) * vocab_size <= MAX_LOGIT_ELEMENTS
            if rows and not fits:  # close the batch before datum d
                if d > first:
                    batch.append(job.piece(first, d))
                yield batch
                batch, rows, width, tokens, first = [], 0, 0, 0, d
            rows, width, tokens = rows + 1, max(width, n), tokens + n
        if job.lengths[first:]:
            batch.append(job.piece(first, len(job.lengths)))
    if batch:
        yield batch


def _run_batch(base: BaseModel, jobs: list[PreparedJob]) -> dict[int, tuple]:
    """One padded forward (and backward if any job trains) over `jobs`, all with datums."""
    model, routing, device = base.model, base.routing, base.device
    lengths = np.array([n for job in jobs for n in job.lengths])
    width = int(lengths.max())
    batch = np.zeros((len(lengths), width), np.int64)  # pad id 0: any valid id works, pads are never read
    for r, seq in enumerate(seq for job in jobs for seq in job.tokens):
        batch[r, : len(seq)] = seq
    keep = np.flatnonzero(np.arange(width)[None, :] < lengths[:, None])  # real tokens, row by row
    row_groups = lora.groups_from_owners([job.job.adapter_id for job in jobs for _ in job.tokens])
    offsets = np.concatenate([[0], np.cumsum(lengths)])  # row -> its first real token among the kept
    token_groups = [(a, int(offsets[s]), int(offsets[e])) for a, s, e in row_groups]

    targets = [job.targets for job in jobs]
    with torch.set_grad_enabled(any(job.train for job in jobs)):
        kept = torch.from_numpy(keep).to(device)
        routing.set(row_groups, kept, token_groups)
        try:
            ids = torch.from_numpy(batch).to(device)
            lean = decode.for_model(base)  # the same modules without the Hugging Face forward's plumbing
            trained = _trained_positions(jobs) if lean is not None and torch.is_grad_enabled() else None
            if trained is not None:
                lps = _gated_target_logprobs(lean.head, routing, lean.forward_sequences(ids, head=False), trained,
                                             targets, kept, token_groups)
            else:
                logits = lean.forward_sequences(ids) if lean is not None else model(input_ids=ids, use_cache=False).logits
                lps = _target_logprobs(logits.float(), targets, device)
        finally:
            routing.clear()
        total, raw = None, {}
        for job, lp in zip(jobs, lps):
            inputs = {k: torch.from_numpy(v).to(device) for k, v in job.inputs.items()}
            lengths = torch.tensor(job.lengths, dtype=torch.long, device=device)
            loss, metrics = job.loss.fn(lp, inputs, job.config, lengths)
            if job.train:
                total = loss if total is None else total + loss
            raw[job.index] = (lp.detach(), loss.detach(), metrics, len(job.targets))
        if total is not None:
            total.backward()
    return {index: (lp.cpu().numpy(), float(loss), metrics, n) for index, (lp, loss, metrics, n) in raw.items()}


def _target_logprobs(logits: torch.Tensor, targets: list[np.ndarray], device) -> list[torch.Tensor]:
    """Each job's log-probabilities of its targets ([n] or [n, K]) from the batch's logits [N, vocab].

    One TargetLogprobs over the whole batch when every job has one target per position, else one
    per job's rows (split, never sliced: a slice's backward zero-fills all of [N, vocab] each time)."""
    sizes = [len(t) for t in targets]
    if all(t.ndim == 1 for t in targets):
        flat = torch.from_numpy(np.concatenate(targets)).to(device)
        return list(TargetLogprobs.apply(logits, flat[:, None]).view(-1).split(sizes))
    return [TargetLogprobs.apply(piece, torch.from_numpy(t).to(device).view(len(t), -1)).view(t.shape)
            for piece, t in zip(logits.split(sizes), targets)]


def _trained_positions(jobs: list[PreparedJob]) -> np.ndarray | None:
    """Which kept positions' logprobs can move a training loss (bool [N]): those whose loss's gate
    input is non-zero (losses.gradient_gate). None -- the unembedding's backward runs over every position --
    when a job has soft targets or a loss without a gate, when a training job has no such position
    (its adapter must still get its all-zero gradient: the optimizer steps a parameter with a zero
    gradient, and skips one with none), or when fewer than a quarter of the positions are spared (a
    second, smaller pass through the head would not pay for itself)."""
    parts = []
    for job in jobs:
        if job.targets.ndim != 1:
            return None
        if not job.train:
            parts.append(np.zeros(len(job.targets), bool))
            continue
        gate = losses.gradient_gate(job.job.loss_fn, job.config)
        if gate is None or not job.inputs[gate].any():
            return None
        parts.append(job.inputs[gate] != 0)
    trained = np.concatenate(parts)
    return trained if trained.sum() <= 0.75 * trained.size else None


def _gated_target_logprobs(head, routing: lora.Routing, hidden: torch.Tensor, trained: np.ndarray,
                           targets: list[np.ndarray], kept: torch.Tensor,
                           token_groups: list[lora.Group]) -> list[torch.Tensor]:
    """What _target_logprobs gives, with the unembedding run twice over the final hidden states: with
    gradient for the `trained` positions, without for the others. Same values; the backward through
    the head and its [positions, vocab] log-softmax covers the trained positions only (for chat data
    the prompt tokens, most of a batch, cost a forward only)."""
    flat = torch.from_numpy(np.concatenate(targets)).to(kept.device)
    lp = torch.zeros(len(flat), device=kept.device)
    for with_grad in (True, False):
        chosen = np.flatnonzero(trained == with_grad)
        if not len(chosen):
            continue
        where = torch.from_numpy(chosen).to(kept.device)
        # The head keeps these positions; each adapter's run of them, renumbered along `chosen`.
        groups = [(a, int(lo), int(hi)) for a, s, e in token_groups
                  for lo, hi in [np.searchsorted(chosen, [s, e])] if hi > lo]
        routing.set(routing.groups, kept[where], groups)
        with torch.set_grad_enabled(with_grad):
            values = TargetLogprobs.apply(head(hidden).float(), flat[where][:, None])
        lp = lp.index_put((where,), values.view(-1))
    return list(lp.split([len(t) for t in targets]))


LOG2_E = 1.4426950408889634


class TargetLogprobs(torch.autograd.Function):
    """log_softmax(logits).gather(1, index), with a backward that reuses the log-softmax's memory.

    The composed ops' backward allocates and fills a zero [N, vocab] gradient for the gather, scatters
    into it, then allocates another for the log-softmax's backward; here the saved log-softmax becomes
    the gradient in place: softmax * -(sum of the incoming gradient per row), plus the incoming
    gradient at the targets. Same values, two passes over [N, vocab] fewer and no new allocation --
    the largest tensors of a training step on a small model."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        logprobs = logits.log_softmax(-1)
        ctx.save_for_backward(logprobs, index)
        return logprobs.gather(1, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logprobs, index = ctx.saved_tensors
        # The forward's buffer (backward runs once: no retain_graph). exp(x) as exp2(x log2 e): torch's
        # exp goes through MKL's vector math, whose generic path on non-Intel CPUs is ~4x slower than
        # the exp2 kernel torch vectorises itself; the extra rounding is ~1e-6 relative.
        grad_logits = logprobs.mul_(LOG2_E).exp2_()
        grad_logits.mul_(grad.sum(1, keepdim=True).neg_())
        return grad_logits.scatter_add_(1, index, grad), None


def _merge(job: PreparedJob, parts: list[tuple]) -> ForwardBackwardResult:
    """The result of a job from its micro-batch pieces (usually just one)."""
    logprobs = np.concatenate([lp for lp, *_ in parts]) if parts else np.zeros(job.targets.shape, np.float32)
    ntokens = sum(n for *_, n in parts)
    metrics = {"loss:sum": sum(loss for _, loss, _, _ in parts), "ntokens:sum": float(ntokens)}
    for key in {k for _, _, m, _ in parts for k in m}:
        values = [(m[key], n) for _, _, m, n in parts]
        reduction = key.rsplit(":", 1)[1]
        if reduction == "sum":
            metrics[key] = sum(v for v, _ in values)
        elif reduction == "mean":  # token-weighted, as if computed over the whole job
            metrics[key] = sum(v * n for v, n in values) / max(1, sum(n for _, n in values))
        else:
            metrics[key] = (max if reduction == "max" else min)(v for v, _ in values)
    per_datum = np.split(logprobs.astype(np.float32, copy=False), np.cumsum(job.lengths)[:-1]) if job.tokens else []
    return ForwardBackwardResult(outputs=[{"logprobs": arr} for arr in per_datum], metrics=metrics)
