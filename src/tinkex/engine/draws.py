"""Seeded token draws for a whole decode batch at once, with no per-request random generator.

Every row draws by inverse CDF: with p = softmax of its temperature / top-k / top-p shaped logits
and one uniform u, the token is the first whose cumulative probability reaches u, which picks token
v with probability p[v], as a multinomial draw would. All rows share one softmax and one search (in
two levels: blocks of tokens, then tokens within the chosen block; see _inverse_cdf).

Each u comes from a counter-based hash of (row key, step), where the row key is derived from the
request's seed and the sample's index. A row's draw therefore depends on nothing but its own seed,
sample, step and logits: the same seed gives the same tokens whatever other requests share the
batch, wherever the row sits in it, and whenever it joined. The hash is Chris Wellons'
"lowbias32" integer finalizer, run with numpy on uint32 arrays (multiplication wraps modulo 2^32), so
one set of vectorised operations serves every row: for a batch's few dozen numbers, each is a
fraction of a torch op's fixed cost.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_GOLDEN = np.uint32(0x9E3779B9)  # odd constants to spread counters over the 32 bits
_SPREAD = np.uint32(0x85EBCA6B)
BLOCK = 128  # tokens per block of the two-level inverse CDF (_inverse_cdf)


def mix32(x: np.ndarray) -> np.ndarray:
    """lowbias32 on a uint32 array, in place (bijective, full avalanche); returns x."""
    with np.errstate(over="ignore"):  # multiplication wraps modulo 2^32, as the hash wants
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return x


def mix32_int(x: int) -> int:
    """mix32 on one Python int (for row keys), the same function."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def new_seed(seed: int | None) -> int:
    """The request's 64-bit seed: the caller's (any integer, reduced mod 2^64), or a random one."""
    return secrets.randbits(64) if seed is None else int(seed) % (1 << 64)


def row_key(seed: int, sample: int) -> int:
    """A 32-bit key for sample `sample` of a request seeded with `seed` (all 64 bits count)."""
    key = mix32_int(seed & 0xFFFFFFFF)
    key = mix32_int(key ^ (seed >> 32))
    return mix32_int(key + sample * int(_GOLDEN))


def uniforms(keys: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """One u in (0, 1) per row, float32, from (keys[r], steps[r]): uint32 keys [R], steps [R] (< 2^32).
    On numpy: a few dozen integer operations on R numbers, each far cheaper there than a torch op."""
    with np.errstate(over="ignore"):
        bits = mix32(steps.astype(np.uint32) * _GOLDEN + _SPREAD)
        bits = mix32(mix32(bits ^ keys) + keys)
    # The top 24 bits, centred in their cell: never exactly 0 or 1.
    return ((bits >> np.uint32(8)).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / (1 << 24))


@dataclass
class DrawParams:
    """The draw parameters of a batch's rows, made once while its rows stay the same: per-row tensors
    on the batch's device, the hash inputs as numpy arrays, and what holds for every row (decided
    here from Python numbers, so that a draw does not ask the tensors)."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_k: torch.Tensor  # int64; the vocabulary size = no limit
    top_p: torch.Tensor  # float32; 1 = no limit
    keys: np.ndarray  # uint32
    steps: np.ndarray  # int64: tokens each row has drawn so far
    all_greedy: bool
    any_greedy: bool
    unmodified: bool  # every row at temperature 1, no top-k or top-p: draws from softmax(logits) itself
    limited: bool  # some row has a top-k or top-p limit

    @classmethod
    def of(cls, temperature: list[float], top_k: list[int], top_p: list[float], keys: list[int], steps: list[int],
           vocab: int, device: torch.device | str = "cpu") -> DrawParams:
        """Rows' parameters as requested: top_k <= 0 or >= vocab means no limit."""
        top_k = [k if 0 < k < vocab else vocab for k in top_k]
        limited = any(k < vocab for k in top_k) or any(p < 1 for p in top_p)
        return cls(temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
                   top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
                   top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
                   keys=np.array(keys, dtype=np.uint32), steps=np.array(steps, dtype=np.int64),
                   all_greedy=all(t == 0 for t in temperature), any_greedy=any(t == 0 for t in temperature),
                   unmodified=not limited and all(t == 1 for t in temperature), limited=limited)


def choose(logits: torch.Tensor, params: DrawParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token per row of float32 logits [R, V]. Returns the tokens and, where it comes free -- every
    row drawn from the unmodified distribution -- their log-probabilities under it (else None)."""
    if params.all_greedy:
        return logits.argmax(-1), None
    scores = logits
    if not params.unmodified:
        scores = logits / torch.where(params.temperature == 0, 1.0, params.temperature)[:, None]
        if params.limited:
            scores = _shape(scores, params.top_k, params.top_p, params.top_p < 1)
    probs = scores.softmax(-1)
    u = torch.from_numpy(uniforms(params.keys, params.steps)).to(logits.device)
    tokens = _inverse_cdf(probs, u)
    if params.any_greedy:
        return torch.where(params.temperature == 0, logits.argmax(-1), tokens), None
    # log of the probability drawn from: as exact as log_softmax at that token (softmax is accurate
    # to a few ulp, and a drawn token's probability is far from underflow).
    logprobs = probs.gather(1, tokens[:, None]).squeeze(1).log() if params.unmodified else None
    return tokens, logprobs


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability reaches u x the row's total (scaled by
    the total, so the rounding of the sum cannot push u past the end).

    In two levels, so that no cumulative sum runs over the whole vocabulary (a sequential pass,
    ~1 ns a number: 4 ms a step for 32 rows of a 150k vocabulary): the block of BLOCK tokens where
    the target falls, from the running sum of block sums, then the token within that block, from a
    running sum of its BLOCK probabilities alone. A zero-probability token (masked by top-k or top-p,
    or padding) is never chosen: its running sum equals the one before it, and the search takes the
    first that reaches the target; so is a block of them."""
    rows, vocab = probs.shape
    if vocab <= 4 * BLOCK:
        cumulative = probs.cumsum(-1)
        target = u * cumulative[:, -1]
        return torch.searchsorted(cumulative, target[:, None]).squeeze(1).clamp(max=vocab - 1)
    blocks = -(-vocab // BLOCK)
    if blocks * BLOCK != vocab:
        probs = F.pad(probs, (0, blocks * BLOCK - vocab))
    tiles = probs.view(rows, blocks, BLOCK)
    sums = tiles.sum(-1)  # [R, blocks]
    running = sums.cumsum(-1)
    target = (u * running[:, -1])[:, None]
    block = torch.searchsorted(running, target).clamp(max=blocks - 1)  # [R, 1]
    before = torch.where(block > 0, running.gather(1, (block - 1).clamp(min=0)), 0.0)
    share = ((target - before) / sums.gather(1, block)).clamp(max=1.0)  # how far into the block, in (0, 1]
    inside = tiles.gather(1, block[:, :, None].expand(rows, 1, BLOCK)).squeeze(1).cumsum(-1)  # [R, BLOCK]
    offset = torch.searchsorted(inside, share * inside[:, -1:]).clamp(max=BLOCK - 1)
    return (block * BLOCK + offset).squeeze(1)


def _shape(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, limited_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k and then top-p leave out, with one sort for all rows."""
    ordered, order = scores.sort(dim=-1, descending=True)
    kth = ordered.gather(1, (top_k - 1)[:, None])
    ordered = ordered.masked_fill(ordered < kth, -math.inf)  # ties with the k-th token stay
    probs = ordered.softmax(-1)
    # Drop a token when the tokens before it already reach top_p; the first one always stays.
    drop = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & limited_p[:, None]
    return torch.empty_like(scores).scatter_(-1, order, ordered.masked_fill(drop, -math.inf))
