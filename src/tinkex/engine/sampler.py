"""Batched sampling with a KV cache, across jobs and adapters of one base model.

1. Prefill: the prompts of all jobs, left-padded into one batch (attention mask + explicit
   positions), run once. The lm_head keeps only the positions whose logits are needed: the last
   one of each prompt, plus the ones whose prompt logprobs were asked for.
2. Expand: each prompt's cache row is repeated num_samples times (`reorder_cache` with repeated
   indices), so the samples of a prompt share its prefill.
3. Decode: one token per row per step through the cache. Rows that stop are dropped from the
   batch (and the cache) at once.

Reported logprobs are those of the *unmodified* distribution (log_softmax of the raw logits, at
temperature 1), so they match what forward_backward computes for the same tokens. Temperature,
top-k and top-p shape only the distribution the token is drawn from, with a per-job seeded
generator: the same seed gives the same tokens.
"""

from __future__ import annotations

import inspect
import math
import secrets
from dataclasses import dataclass, field

import numpy as np
import torch

from . import lora
from .api import EngineError, SampledSeq, SampleJob, SampleResult
from .models import BaseModel

MAX_SAMPLES = 128
MAX_ROWS_PER_BATCH = 256  # decode rows (sum of num_samples) in one batch
MAX_PREFILL_TOKENS = 1 << 16  # padded prompt tokens in one batch
TOPK_SENTINEL = (0, -99999.0)  # Tinker's "no entry" cell of a top-k table


@dataclass
class PreparedSample:
    index: int  # position in the caller's list
    job: SampleJob
    stop_ids: frozenset[int]
    first_prompt_logprob: int  # first prompt position whose logprob/top-k is reported (len(prompt) = none)
    tail_tokens: int  # how many trailing tokens to decode when looking for stop strings
    # filled while running
    rows: list[list[int]] = field(default_factory=list)
    row_logprobs: list[list[float]] = field(default_factory=list)
    row_topk: list[list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)
    result: SampleResult | None = None

    @property
    def owner(self) -> str | None:
        return self.job.adapter_id

    @property
    def wants_prompt(self) -> bool:
        return self.job.prompt_logprobs or self.job.topk_prompt_logprobs > 0


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
    first = len(prompt)
    if job.prompt_logprobs or job.topk_prompt_logprobs:
        first = 1 if last_n is None else max(1, len(prompt) - last_n)
    # Every token decodes to at least one byte, so a stop string of b bytes ending in the newest
    # token lies within the last b tokens; two more absorb a leading space or a split character.
    tail = max((len(s.encode()) for s in job.stop_strings), default=0) + 2
    return PreparedSample(index, job, stop_ids, first, tail)


def run(base: BaseModel, jobs: list[PreparedSample]) -> dict[int, SampleResult]:
    jobs = sorted(jobs, key=lambda j: j.owner or "")  # rows of one adapter are contiguous
    for batch in _batches(jobs):
        _run_batch(base, batch)
    return {job.index: job.result for job in jobs}


def _batches(jobs: list[PreparedSample]):
    batch, rows, longest = [], 0, 0
    for job in jobs:
        n, length = job.job.num_samples, len(job.job.prompt)
        if batch and (rows + n > MAX_ROWS_PER_BATCH or max(longest, length) * (len(batch) + 1) > MAX_PREFILL_TOKENS):
            yield batch
            batch, rows, longest = [], 0, 0
        batch.append(job)
        rows, longest = rows + n, max(longest, length)
    if batch:
        yield batch


@torch.inference_mode()
def _run_batch(base: BaseModel, jobs: list[PreparedSample]) -> None:
    step = _Stepper(base)
    last_logits = _prefill(step, jobs)
    _decode(step, jobs, last_logits)
    for job in jobs:
        job.result.sequences = [_sequence(job, s) for s in range(job.job.num_samples)]


def _prefill(step: _Stepper, jobs: list[PreparedSample]) -> torch.Tensor:
    """Run all prompts, left-padded, through the model once. Fills each job's prompt logprobs and
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
        # Logits at p predict token p+1: prompt logprobs from position `first` need logits from first-1.
        span = range(j * width + pad + job.first_prompt_logprob - 1, (j + 1) * width)
        keep.extend(span)
        kept_owners.extend([job.owner] * len(span))
    device = step.device
    logits = step.prefill(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device),
                          [job.owner for job in jobs],
                          head=(torch.tensor(keep, device=device), lora.groups_from_owners(kept_owners)))
    last, start = [], 0
    for job, n in zip(jobs, lengths):
        count = n - job.first_prompt_logprob + 1
        job_logits = logits[start:start + count].float()
        start += count
        job.result = _prompt_result(job, job_logits[:-1])
        last.append(job_logits[-1])
    return torch.stack(last)


def _decode(step: _Stepper, jobs: list[PreparedSample], last_logits: torch.Tensor) -> None:
    """Sample every row of every job until it stops; rows are (job, sample) pairs."""
    for job in jobs:
        n = job.job.num_samples
        job.rows, job.row_logprobs, job.row_topk = ([[] for _ in range(n)] for _ in range(3))
        job.stopped = [False] * n
    live = [(j, s) for j, job in enumerate(jobs) if job.job.max_tokens > 0 for s in range(job.job.num_samples)]
    if not live:
        return
    logits = step.select([j for j, _ in live], last_logits)  # each prompt's cache row, once per sample
    generators = [_generator(job.job.seed, step.device) for job in jobs]
    while True:
        logprobs = logits.float().log_softmax(-1)  # the unmodified distribution, for reporting
        tokens = torch.empty(len(live), dtype=torch.long, device=step.device)
        for j, lo, hi in _segments([j for j, _ in live]):
            tokens[lo:hi] = _choose(logits[lo:hi].float(), jobs[j].job, generators[j])
        token_list = tokens.tolist()
        token_lp = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
        k_max = max(jobs[j].job.topk_sample_logprobs for j, _ in live)
        if k_max:
            top = logprobs.topk(k_max, dim=-1)
            top_ids, top_values = top.indices.cpu().numpy(), top.values.cpu().numpy()
        survivors = []
        for r, (j, s) in enumerate(live):
            job = jobs[j]
            job.rows[s].append(token_list[r])
            job.row_logprobs[s].append(token_lp[r])
            if k := job.job.topk_sample_logprobs:
                job.row_topk[s].append((top_ids[r, :k], top_values[r, :k]))
            if job.job.on_tokens is not None:  # streaming listeners see every row as it grows
                job.job.on_tokens(s, job.rows[s])
            if _stops(job, s, token_list[r], step.base):
                job.stopped[s] = True
            elif len(job.rows[s]) < job.job.max_tokens:
                survivors.append(r)
        if not survivors:
            return
        if len(survivors) < len(live):  # drop finished rows from the batch and the cache
            tokens = step.select(survivors, tokens)
            live = [live[r] for r in survivors]
        logits = step.decode(tokens, [jobs[j].owner for j, _ in live])


class _Stepper:
    """Runs the model for the prefill and each decode step; owns the batch's KV cache, attention
    mask and next positions, and keeps them in step with the rows."""

    def __init__(self, base: BaseModel):
        self.base, self.device = base, base.device
        self.cache = None
        self.attention: torch.Tensor | None = None  # [rows, cached tokens + 1]
        self.next_pos: torch.Tensor | None = None  # [rows] position of each row's next token
        # transformers >= 5.2x names the argument `cache`; earlier versions `past_key_values`.
        parameters = inspect.signature(base.model.forward).parameters
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"

    def prefill(self, input_ids: torch.Tensor, attention: torch.Tensor, owners: list[str | None],
                head: tuple[torch.Tensor, list]) -> torch.Tensor:
        """Left-padded prompts [rows, width] with their mask; logits at the `head` positions."""
        self.attention = attention
        self.next_pos = attention.sum(-1)  # the first sampled token follows the prompt
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        return self._forward(input_ids, positions, owners, head)

    def decode(self, tokens: torch.Tensor, owners: list[str | None]) -> torch.Tensor:
        """One new token per row; next-token logits [rows, vocab]."""
        self.attention = torch.cat([self.attention, self.attention.new_ones(len(tokens), 1)], dim=1)
        logits = self._forward(tokens[:, None], self.next_pos[:, None], owners)[:, -1]
        self.next_pos = self.next_pos + 1
        return logits

    def _forward(self, input_ids, position_ids, owners, head=None) -> torch.Tensor:
        routing = self.base.routing
        groups = lora.groups_from_owners(owners)  # row r belongs to adapter owners[r] (None: base)
        head_index, head_groups = head if head is not None else (None, None)
        routing.set(groups, head_index, head_groups)
        kwargs = {self.cache_arg: self.cache} if self.cache is not None else {}
        try:
            out = self.base.model(input_ids=input_ids, attention_mask=self.attention, position_ids=position_ids,
                                  use_cache=True, **kwargs)
        finally:
            routing.clear()
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else getattr(out, "past_key_values", None)
        return out.logits

    def select(self, rows: list[int], also: torch.Tensor) -> torch.Tensor:
        """Keep (or repeat) these rows of the cache, mask and positions; returns `also` likewise."""
        index = torch.tensor(rows, device=self.device)
        self.cache.reorder_cache(index)
        self.attention = self.attention.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)
        return also.index_select(0, index)


def _segments(owners: list[int]):
    """(value, start, stop) for each run of equal values."""
    start = 0
    for i in range(1, len(owners) + 1):
        if i == len(owners) or owners[i] != owners[start]:
            yield owners[start], start, i
            start = i


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    seed = secrets.randbits(63) if seed is None else int(seed) % (1 << 63)
    return torch.Generator(device=device).manual_seed(seed)


def _choose(logits: torch.Tensor, job: SampleJob, generator: torch.Generator) -> torch.Tensor:
    """Draw one token per row from the temperature / top-k / top-p shaped distribution."""
    if job.temperature == 0:
        return logits.argmax(-1)
    scores = logits / job.temperature
    if 0 < job.top_k < scores.shape[-1]:
        kth = scores.topk(job.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if job.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        # Drop a token when the tokens before it already reach top_p; the first one always stays.
        drop = (probs.cumsum(-1) - probs) >= job.top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, -math.inf))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)


def _stops(job: PreparedSample, s: int, token: int, base: BaseModel) -> bool:
    if token in job.stop_ids:
        return True
    if job.job.stop_strings:
        text = base.tokenizer.decode(job.rows[s][-job.tail_tokens:])
        return any(stop in text for stop in job.job.stop_strings)
    return False


def _prompt_result(job: PreparedSample, logits: torch.Tensor) -> SampleResult:
    """Prompt logprobs and top-k from the logits at positions first-1 .. len(prompt)-2."""
    prompt = job.job.prompt
    result = SampleResult(sequences=[])
    first = job.first_prompt_logprob
    logprobs = logits.log_softmax(-1) if len(logits) else logits
    if job.job.prompt_logprobs:
        values = np.full(len(prompt), np.nan, np.float32)
        if len(logits):
            targets = torch.tensor(prompt[first:], device=logits.device)
            values[first:] = logprobs.gather(1, targets[:, None]).squeeze(1).cpu().numpy()
        result.prompt_logprobs = values
    k = job.job.topk_prompt_logprobs
    if k:
        ids = np.full((len(prompt), k), TOPK_SENTINEL[0], np.int32)
        values = np.full((len(prompt), k), TOPK_SENTINEL[1], np.float32)
        if len(logits):
            top = logprobs.topk(k, dim=-1)
            ids[first:] = top.indices.cpu().numpy()
            values[first:] = top.values.cpu().numpy()
        result.topk_prompt_token_ids, result.topk_prompt_logprobs = ids, values
    return result


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
