"""Seeded token draws for a whole decode batch at once, with no per-request random generator.

Every row draws by inverse CDF: with p = softmax of its temperature / top-k / top-p shaped logits
and one uniform u, the token is the first whose cumulative probability reaches u, which picks token
v with probability p[v], as a multinomial draw would. All rows share one softmax, one cumsum and one
searchsorted.

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

import numpy as np
import torch

_GOLDEN = np.uint32(0x9E3779B9)  # odd constants to spread counters over the 32 bits
_SPREAD = np.uint32(0x85EBCA6B)


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


def choose(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           keys: np.ndarray, steps: np.ndarray) -> torch.Tensor:
    """One token per row of float32 logits [R, V]. Per row: temperature (0 = greedy), top_k (V or more
    = no limit), top_p (1 = no limit), key (uint32) and step (int64, the row's tokens so far)."""
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
    target = torch.from_numpy(uniforms(keys, steps)).to(logits.device) * cumulative[:, -1]
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
