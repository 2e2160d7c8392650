"""Seeded token draws for a whole decode batch at once, with no per-request random generator.

Every row draws by inverse CDF: with p = softmax of its temperature / top-k / top-p shaped logits
and one uniform u, the token is the first whose cumulative probability reaches u, which picks token
v with probability p[v], as a multinomial draw would. All rows share one softmax, one cumsum and one
searchsorted.

Each u comes from a counter-based hash of (row key, step), where the row key is derived from the
request's seed and the sample's index. A row's draw therefore depends on nothing but its own seed,
sample, step and logits: the same seed gives the same tokens whatever other requests share the
batch, wherever the row sits in it, and whenever it joined. The hash is Chris Wellons'
"lowbias32" integer finalizer, run on int32 tensors (multiplication wraps modulo 2^32; right shifts
are masked to make them logical), so one set of vectorised ops serves every row.
"""

from __future__ import annotations

import math
import secrets

import torch

_GOLDEN = 0x9E3779B9  # odd constants to spread counters over the 32 bits
_SPREAD = 0x85EBCA6B


def _i32(value: int) -> int:
    """A 32-bit pattern as the signed int32 that holds it."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int32 tensor of 32-bit patterns (bijective, full avalanche)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _i32(0x7FEB352D)
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _i32(0x846CA68B)
    return x ^ ((x >> 16) & 0xFFFF)


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
    """A 32-bit key (as a signed int32) for sample `sample` of a request seeded with `seed` (all 64
    bits count)."""
    key = mix32_int(seed & 0xFFFFFFFF)
    key = mix32_int(key ^ (seed >> 32))
    return _i32(mix32_int(key + sample * _GOLDEN))


def uniforms(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One u in (0, 1) per row, float32, from (keys[r], steps[r]): int32 keys [R], steps [R] (< 2^31)."""
    bits = mix32(mix32(keys ^ mix32(steps.to(torch.int32) * _i32(_GOLDEN) + _i32(_SPREAD))) + keys)
    # The top 24 bits, centred in their cell: never exactly 0 or 1.
    return (((bits >> 8) & 0xFFFFFF).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def choose(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One token per row of float32 logits [R, V]. Per row: temperature (0 = greedy), top_k (V or more
    = no limit), top_p (1 = no limit), key (int32) and step (int64, the row's tokens so far)."""
    greedy = temperature == 0
    if bool(greedy.all()):
        return logits.argmax(-1)
    vocab = logits.shape[-1]
    scores = logits / torch.where(greedy, 1.0, temperature)[:, None]
    limited_p = top_p < 1
    if bool((top_k < vocab).any() | limited_p.any()):
        scores = _shape(scores, top_k.clamp(max=vocab), top_p, limited_p)
    # Inverse CDF: the first token whose cumulative probability reaches u (scaled by the total, so
    # the rounding of the sum cannot push u past the end). Masked tokens have zero width.
    cumulative = scores.softmax(-1).cumsum(-1)
    target = uniforms(keys, steps) * cumulative[:, -1]
    drawn = torch.searchsorted(cumulative, target[:, None]).squeeze(1).clamp(max=vocab - 1)
    return torch.where(greedy, logits.argmax(-1), drawn) if bool(greedy.any()) else drawn


def _shape(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, limited_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k and then top-p leave out, with one sort for all rows."""
    ordered, order = scores.sort(dim=-1, descending=True)
    kth = ordered.gather(1, (top_k - 1)[:, None])
    ordered = ordered.masked_fill(ordered < kth, -math.inf)  # ties with the k-th token stay
    probs = ordered.softmax(-1)
    # Drop a token when the tokens before it already reach top_p; the first one always stays.
    drop = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & limited_p[:, None]
    return torch.empty_like(scores).scatter_(-1, order, ordered.masked_fill(drop, -math.inf))
