"""Batched sampling with a KV cache, across requests and adapters of one base model, with
continuous batching: a request that arrives while others decode joins them at the next step.

A `DecodeBatch` holds the running rows of one base model, one row per (request, sample). Each
`step()` does two things:

1. Admission: queued requests (as many as the row budget allows) are prefilled together, their
   prompts left-padded into one batch and run once. The lm_head keeps only the positions whose
   logits are needed: the last one of each prompt, plus those whose prompt logprobs (or target
   prompt logprobs) were asked for. Each prompt's cache row is then repeated num_samples times, so
   the samples of a request share its prefill, and the new rows join the running ones (the
   cache's `extend`; kvcache.py has the two kinds of cache).
2. Decoding: every row draws its next token from its pending logits, rows that stop leave the batch
   (and the cache) at once, and the others run one decode forward together -- through the lean
   decoder (decode.py) for Llama-style models, the Hugging Face forward for the others.

Reported logprobs are those of the *unmodified* distribution (log_softmax of the raw logits, at
temperature 1), so they match what forward_backward computes for the same tokens. Temperature,
top-k and top-p shape only the distribution the token is drawn from.

All rows draw at once (draws.choose): temperature, top-k and top-p are per-row tensors, and each
row's uniform is a counter-based hash of its request's seed, its sample index and its step, so no
per-request generator is called. Every row also has its own attention mask and positions: the
tokens of a request do not depend on which other requests share the batch, or on when it joined
(up to the float rounding of differently sized batches, which is far below what changes a draw).
The same seed gives the same tokens.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from . import draws, lora
from .api import EngineError, SampledSeq, SampleJob, SampleResult
from .kvcache import DenseCache, RowCache, new_cache
from .models import BaseModel

MAX_SAMPLES = 128
MAX_ROWS_PER_BATCH = 256  # decode rows (sum of num_samples) running at once
MAX_PREFILL_TOKENS = 1 << 16  # padded prompt tokens in one admission
# A forward with fewer multiply-adds than this (tokens x weights, ~10 ms on one core) runs its ops
# on one CPU thread: they are too small to gain from splitting, and waking a second thread for each
# of them costs more than the op itself -- far more when the other cores are busy (the server's own
# threads, say).
SMALL_STEP = 1 << 28
TOPK_SENTINEL = (0, -99999.0)  # Tinker's "no entry" cell of a top-k table


@dataclass
class PreparedSample:
    index: int  # position in the caller's list
    job: SampleJob
    stop_ids: frozenset[int]
    first_prompt_logprob: int  # first prompt position whose logprob/top-k is reported (len(prompt) = none)
    first_logit: int  # first prompt position whose logits the prefill keeps (the last one always)
    tail_tokens: int  # how many trailing tokens to decode when looking for stop strings
    targets: np.ndarray | None  # int64 [len(prompt) - 1, K], -1 = no request
    keys: list[int] = field(default_factory=list)  # each sample's draw key (draws.row_key)
    # filled while running
    rows: list[list[int]] = field(default_factory=list)
    row_logprobs: list[list[float]] = field(default_factory=list)
    row_topk: list[list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)
    live: int = 0  # rows still decoding
    result: SampleResult | None = None

    @property
    def owner(self) -> str | None:
        return self.job.adapter_id


def prepare(index: int, job: SampleJob, base: BaseModel) -> PreparedSample:
    """Check a job's parameters; raise EngineError saying exactly what is wrong."""
    info = base.info
    prompt = np.asarray(job.prompt)
    if prompt.ndim != 1 or len(prompt) == 0:
        raise EngineError("prompt must be a non-empty list of token ids")
    if prompt.dtype.kind not in "iu":
        raise EngineError(f"prompt must be token ids (integers), got dtype {prompt.dtype}")
    if prompt.min() < 0 or prompt.max() >= info.vocab_size:
        raise EngineError(f"prompt token id {int(prompt[(prompt < 0) | (prompt >= info.vocab_size)][0])} "
                          f"is outside the vocabulary [0, {info.vocab_size})")
    if not isinstance(job.max_tokens, int) or job.max_tokens < 0:
        raise EngineError(f"max_tokens must be an integer >= 0, got {job.max_tokens!r}")
    if len(prompt) + job.max_tokens > info.max_context_length:
        raise EngineError(f"prompt ({len(prompt)} tokens) + max_tokens ({job.max_tokens}) exceeds the "
                          f"model's context of {info.max_context_length}")
    if not isinstance(job.num_samples, int) or not 1 <= job.num_samples <= MAX_SAMPLES:
        raise EngineError(f"num_samples must be between 1 and {MAX_SAMPLES}, got {job.num_samples!r}")
    if not (isinstance(job.temperature, (int, float)) and math.isfinite(job.temperature) and job.temperature >= 0):
        raise EngineError(f"temperature must be a finite number >= 0, got {job.temperature!r}")
    if not (isinstance(job.top_p, (int, float)) and 0 < job.top_p <= 1):
        raise EngineError(f"top_p must be in (0, 1], got {job.top_p!r}")
    if not isinstance(job.top_k, int) or job.top_k < -1:
        raise EngineError(f"top_k must be -1 (no limit) or a positive integer, got {job.top_k!r}")
    for name in ("topk_prompt_logprobs", "topk_sample_logprobs"):
        k = getattr(job, name)
        if not isinstance(k, int) or not 0 <= k <= info.vocab_size:
            raise EngineError(f"{name} must be between 0 and the vocabulary size {info.vocab_size}, got {k!r}")
    last_n = job.prompt_logprobs_last_n
    if last_n is not None and (not isinstance(last_n, int) or last_n < 0):
        raise EngineError(f"prompt_logprobs_last_n must be an integer >= 0, got {last_n!r}")
    if job.stop_token_ids is None:
        stop_ids = base.eos_ids
    else:
        stop_ids = frozenset(int(t) for t in job.stop_token_ids)
        bad = [t for t in stop_ids if not 0 <= t < info.vocab_size]
        if bad:
            raise EngineError(f"stop token id {bad[0]} is outside the vocabulary [0, {info.vocab_size})")
    if any(not isinstance(s, str) or not s for s in job.stop_strings):
        raise EngineError("stop strings must be non-empty strings")
    targets = _check_targets(job.target_prompt_tokens, len(prompt), info.vocab_size)
    first = len(prompt)
    if job.prompt_logprobs or job.topk_prompt_logprobs:
        first = 1 if last_n is None else max(1, len(prompt) - last_n)
    # Logits at p predict token p + 1: prompt logprobs from `first` need logits from first - 1, and
    # target row r needs the logits at r.
    first_logit = min(first - 1, len(prompt) - 1)
    if targets is not None and (wanted := np.flatnonzero((targets >= 0).any(axis=1))).size:
        first_logit = min(first_logit, int(wanted[0]))
    # Every token decodes to at least one byte, so a stop string of b bytes ending in the newest
    # token lies within the last b tokens; two more absorb a leading space or a split character.
    tail = max((len(s.encode()) for s in job.stop_strings), default=0) + 2
    n = job.num_samples
    seed = draws.new_seed(job.seed)
    return PreparedSample(index, job, stop_ids, first, first_logit, tail, targets,
                          keys=[draws.row_key(seed, s) for s in range(n)],
                          rows=[[] for _ in range(n)], row_logprobs=[[] for _ in range(n)],
                          row_topk=[[] for _ in range(n)], stopped=[False] * n)


def _check_targets(targets, prompt_length: int, vocab_size: int) -> np.ndarray | None:
    if targets is None:
        return None
    array = np.asarray(targets)
    if array.dtype.kind not in "iu":
        raise EngineError(f"target_prompt_tokens must be token ids (integers), got dtype {array.dtype}")
    if array.ndim != 2 or array.shape[0] != prompt_length - 1:
        raise EngineError(f"target_prompt_tokens must have shape [len(prompt) - 1, K] = [{prompt_length - 1}, K], "
                          f"got {list(array.shape)}")
    bad = array[(array < -1) | (array >= vocab_size)]
    if bad.size:
        raise EngineError(f"target_prompt_tokens: token id {int(bad[0])} is outside the vocabulary "
                          f"[0, {vocab_size}) (-1 marks an unused cell)")
    return array.astype(np.int64, copy=False)


class DecodeBatch:
    """The running sample requests of one base model (see the module docstring)."""

    def __init__(self, base: BaseModel):
        self.base = base
        self.pending: deque[PreparedSample] = deque()
        self.cache = new_cache(base)
        self.rows: list[tuple[PreparedSample, int]] = []  # (request, sample index), one per cache row
        self.logits: torch.Tensor | None = None  # [rows, vocab]: each row's next-token logits, not yet drawn from
        self.params: draws.DrawParams | None = None  # the rows' draw parameters; None: to be rebuilt from self.rows
        self.weights = sum(p.numel() for p in base.model.parameters())  # ~ multiply-adds per row and step

    @property
    def idle(self) -> bool:
        return not self.pending and not self.rows

    def jobs(self) -> Iterator[PreparedSample]:
        yield from self.pending
        yield from {id(job): job for job, _ in self.rows}.values()

    def submit(self, jobs: list[PreparedSample]) -> None:
        self.pending.extend(jobs)

    @torch.inference_mode()
    def step(self) -> list[PreparedSample]:
        """Admit what waits (if there is room), then decode one token in every row. Returns the
        requests that finished, their `result` complete."""
        finished = self._admit()
        if self.rows:
            with self._threads_for(len(self.rows)):
                finished += self._decode()
        return finished

    @torch.inference_mode()  # the cache's tensors were made in inference mode
    def cancel(self, adapter_id: str) -> list[PreparedSample]:
        """Drop every request that samples from this adapter (it is being removed); returns them."""
        gone = [job for job in self.jobs() if job.owner == adapter_id]
        if gone:
            self.pending = deque(job for job in self.pending if job.owner != adapter_id)
            self._keep([r for r, (job, _) in enumerate(self.rows) if job.owner != adapter_id])
        return gone

    # --- admission ----------------------------------------------------------------------------

    def _admit(self) -> list[PreparedSample]:
        if not self.pending or (self.rows and not self.cache.mergeable):
            return []  # a cache that cannot take new rows lets them wait for the batch to drain
        batch, rows, longest = [], len(self.rows), 0
        while self.pending:
            job = self.pending[0]
            n, length = job.job.num_samples if job.job.max_tokens > 0 else 0, len(job.job.prompt)
            if rows + n > MAX_ROWS_PER_BATCH and (batch or self.rows):
                break  # wait for rows to finish
            if batch and max(longest, length) * (len(batch) + 1) > MAX_PREFILL_TOKENS:
                break
            batch.append(self.pending.popleft())
            rows, longest = rows + n, max(longest, length)
        if not batch:
            return []
        batch.sort(key=lambda job: job.owner or "")  # rows of one adapter contiguous in the prefill
        fresh = new_cache(self.base)
        with self._threads_for(longest * len(batch)):
            last_logits = _prefill(fresh, batch)
        new_rows = [(j, s) for j, job in enumerate(batch) if job.job.max_tokens > 0 for s in range(job.job.num_samples)]
        fresh.select([j for j, _ in new_rows])  # each prompt's cache row, once per sample
        if self.rows:
            self.cache.extend(fresh)
        else:  # an idle batch simply takes the new cache
            self.cache = fresh
        self.rows += [(batch[j], s) for j, s in new_rows]
        self.params = None
        if new_rows:
            index = torch.tensor([j for j, _ in new_rows], device=last_logits.device)
            new_logits = last_logits.index_select(0, index)
            self.logits = new_logits if self.logits is None else torch.cat([self.logits, new_logits])
        for job in batch:
            job.live = job.job.num_samples if job.job.max_tokens > 0 else 0
        self._group_by_adapter()
        finished = [job for job in batch if job.live == 0]
        for job in finished:
            _finish(job)
        return finished

    def _threads_for(self, tokens: int):
        """One CPU thread for a forward over this many tokens if it is small (see SMALL_STEP)."""
        return _threads(1 if tokens * self.weights < SMALL_STEP else None)

    def _group_by_adapter(self) -> None:
        """Reorder rows so each adapter's are contiguous (one LoRA product per adapter and layer).
        The sort is stable, so the rows of one request stay together and in order."""
        order = sorted(range(len(self.rows)), key=lambda r: self.rows[r][0].owner or "")
        if order != list(range(len(self.rows))):
            self._keep(order)

    def _keep(self, rows: list[int]) -> None:
        """Keep these rows (of the cache, the pending logits and the bookkeeping), in this order."""
        if rows == list(range(len(self.rows))):
            return
        self.cache.select(rows)
        self.rows = [self.rows[r] for r in rows]
        self.params = None
        self.logits = self.logits.index_select(0, torch.tensor(rows, device=self.logits.device)) if rows else None

    # --- decoding ----------------------------------------------------------------------------

    def _decode(self) -> list[PreparedSample]:
        logits = self.logits.float()
        if self.params is None:
            self.params = _draw_params(self.rows, logits.shape[-1], logits.device)
        tokens, token_lp = draws.choose(logits, self.params)
        self.params.steps += 1
        # Reported logprobs are the unmodified distribution's, at temperature 1: from the draw when it
        # drew from that distribution, else from log_softmax (rather than logit - logsumexp, whose exp
        # goes through MKL's vector math, slow on non-Intel CPUs), as they are for a top-k.
        k_max = max(job.job.topk_sample_logprobs for job, _ in self.rows)
        if token_lp is None or k_max:
            logprobs = logits.log_softmax(-1)
            token_lp = logprobs.gather(1, tokens[:, None]).squeeze(1)
        if k_max:
            top = logprobs.topk(k_max, dim=-1)
            top_ids, top_values = top.indices.cpu().numpy(), top.values.cpu().numpy()
        token_list, token_lp = tokens.tolist(), token_lp.tolist()
        survivors, finished = [], []
        for r, (job, s) in enumerate(self.rows):
            job.rows[s].append(token_list[r])
            job.row_logprobs[s].append(token_lp[r])
            if k := job.job.topk_sample_logprobs:
                job.row_topk[s].append((top_ids[r, :k], top_values[r, :k]))
            if job.job.on_tokens is not None:  # streaming listeners see every row as it grows
                job.job.on_tokens(s, job.rows[s])
            if _stops(job, s, token_list[r], self.base):
                job.stopped[s] = True
            elif len(job.rows[s]) < job.job.max_tokens:
                survivors.append(r)
                continue
            job.live -= 1
            if job.live == 0:
                _finish(job)
                finished.append(job)
        if len(survivors) < len(self.rows):  # drop finished rows from the batch and the cache
            self._keep(survivors)
            tokens = tokens[survivors]
        if self.rows:
            self.logits = self.cache.decode(tokens, [job.owner for job, _ in self.rows])
        return finished


def _draw_params(rows: list[tuple[PreparedSample, int]], vocab: int, device: torch.device) -> draws.DrawParams:
    jobs = [job.job for job, _ in rows]
    return draws.DrawParams.of([float(j.temperature) for j in jobs], [j.top_k for j in jobs],
                               [float(j.top_p) for j in jobs], [job.keys[s] for job, s in rows],
                               [len(job.rows[s]) for job, s in rows], vocab, device)


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Run torch on at most `count` CPU threads inside (None: as configured). On CPU the setting is
    per calling thread, and it is restored on the way out."""
    before = torch.get_num_threads()
    if count is None or count >= before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _prefill(cache: DenseCache | RowCache, jobs: list[PreparedSample]) -> torch.Tensor:
    """Run all prompts, left-padded, through the model once. Fills each job's prompt results and
    returns the next-token logits of each prompt, [jobs, vocab]."""
    lengths = [len(job.job.prompt) for job in jobs]
    width = max(lengths)
    ids = np.zeros((len(jobs), width), np.int64)
    mask = np.zeros((len(jobs), width), np.int64)
    keep, kept_owners = [], []  # flat positions whose logits we need, and their adapters
    for j, (job, n) in enumerate(zip(jobs, lengths)):
        pad = width - n
        ids[j, pad:] = job.job.prompt
        mask[j, pad:] = 1
        span = range(j * width + pad + job.first_logit, (j + 1) * width)
        keep.extend(span)
        kept_owners.extend([job.owner] * len(span))
    device = cache.device
    logits = cache.prefill(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device),
                           [job.owner for job in jobs],
                           head=(torch.tensor(keep, device=device), lora.groups_from_owners(kept_owners)))
    last, start = [], 0
    for job, n in zip(jobs, lengths):
        count = n - job.first_logit
        job_logits = logits[start:start + count].float()  # positions first_logit .. n-1
        start += count
        job.result = _prompt_result(job, job_logits[:-1])
        last.append(job_logits[-1])
    return torch.stack(last)


def _stops(job: PreparedSample, s: int, token: int, base: BaseModel) -> bool:
    if token in job.stop_ids:
        return True
    if job.job.stop_strings:
        text = base.tokenizer.decode(job.rows[s][-job.tail_tokens:])
        return any(stop in text for stop in job.job.stop_strings)
    return False


def _prompt_result(job: PreparedSample, logits: torch.Tensor) -> SampleResult:
    """Prompt logprobs, top-k and target logprobs from the logits at positions first_logit .. len(prompt)-2
    (logits[i] predicts prompt token first_logit + i + 1)."""
    prompt = job.job.prompt
    result = SampleResult(sequences=[])
    first, offset = job.first_prompt_logprob, job.first_logit
    logprobs = logits.log_softmax(-1) if len(logits) else logits
    reported = logprobs[first - 1 - offset:]  # the positions whose prompt logprob / top-k is reported
    if job.job.prompt_logprobs:
        values = np.full(len(prompt), np.nan, np.float32)
        if len(reported):
            targets = torch.tensor(prompt[first:], device=logits.device)
            values[first:] = reported.gather(1, targets[:, None]).squeeze(1).cpu().numpy()
        result.prompt_logprobs = values
    k = job.job.topk_prompt_logprobs
    if k:
        ids = np.full((len(prompt), k), TOPK_SENTINEL[0], np.int32)
        values = np.full((len(prompt), k), TOPK_SENTINEL[1], np.float32)
        if len(reported):
            top = reported.topk(k, dim=-1)
            ids[first:] = top.indices.cpu().numpy()
            values[first:] = top.values.cpu().numpy()
        result.topk_prompt_token_ids, result.topk_prompt_logprobs = ids, values
    if job.targets is not None:
        wanted = job.targets[offset:]  # rows offset.. are predicted by logits[0..]
        values = np.zeros(job.targets.shape, np.float32)
        if wanted.size:
            cells = torch.from_numpy(np.maximum(wanted, 0)).to(logits.device)
            got = logprobs.gather(1, cells).cpu().numpy()
            values[offset:] = np.where(wanted >= 0, got, 0.0)
        result.target_prompt_logprobs = values
    return result


def _finish(job: PreparedSample) -> None:
    job.result.sequences = [_sequence(job, s) for s in range(job.job.num_samples)]


def _sequence(job: PreparedSample, s: int) -> SampledSeq:
    seq = SampledSeq(
        tokens=np.array(job.rows[s], np.int32),
        logprobs=np.array(job.row_logprobs[s], np.float32),
        stop_reason="stop" if job.stopped[s] else "length",
    )
    k = job.job.topk_sample_logprobs
    if k:
        rows = job.row_topk[s]
        seq.topk_token_ids = np.array([ids for ids, _ in rows], np.int32).reshape(len(rows), k)
        seq.topk_logprobs = np.array([lp for _, lp in rows], np.float32).reshape(len(rows), k)
    return seq
