"""The built-in Tinker losses, on the learner's per-token target logprobs of one job.

Each loss sees the job's tokens flattened (all datums concatenated, no padding): `lp` is [N] (or
[N, K] for cross_entropy with soft targets), every input has the same leading N, and `lengths`
([D], int64) says how many of the N tokens each datum has. Losses are sums over tokens (and over
datums), so a job's loss is the sum of its datums' losses. With ratio = exp(lp - q), q the sampler's
logprob (input `logprobs`), A the advantage and sg() a stop-gradient, the per-token terms are:

    cross_entropy        -lp * weight
    importance_sampling  -ratio * A
    ppo                  -min(ratio * A, clip(ratio, lo, hi) * A)
    cispo                -sg(clip(ratio, lo, hi)) * lp * A
    dro                  -(lp * A - beta / 2 * (lp - q)^2)
    gspo                 -min(r_t * A, clip(r_t, lo, hi) * A)
                            r_t = sg(s) * exp(lp - sg(lp)): the value of s, the gradient of lp
                            s = exp(mean of (lp - q) over the datum's tokens where sequence_ratio_mask != 0)
    stable_reinforce     -sg(min(ratio, cap)) * lp * A + kl_coeff * (ratio - 1 - (lp - q))

gspo is GSPO-token (Zheng et al., 2025, as the Tinker documentation defines it): one
length-normalised importance ratio s per datum (a datum is one sampled sequence), clipped like PPO
but with GSPO's much narrower range; every token carries s's value and its own logprob's gradient,
so per-token advantages still work. A datum whose mask is all zero has s = 1. The mask defaults to
all ones (every token of the datum). The loss_fn_config keys and defaults of every loss are in
tinkex.engine.api.LOSS_INPUTS.

stable_reinforce is REINFORCE with a truncated, stop-gradient importance weight (the weight never
exceeds `clip_high_threshold`, so a stale or mismatched sample cannot blow up the step) plus a KL
penalty towards the sampler: kl_coeff times the "k3" estimator (r - 1) - log r of KL(q || p), which is
>= 0 for every token, zero with zero gradient where the learner equals the sampler, and whose
gradient (r - 1) * grad(lp) pulls the ratio back towards 1. The hosted service also reads provenance
spans (sequence ids of the recorded samples); here the sampler logprobs of the datum play that role,
and the spans are accepted and ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .api import LOSS_INPUTS, loss_spec

Metrics = dict[str, float]
LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor], dict[str, float], torch.Tensor], tuple[torch.Tensor, Metrics]]


def cross_entropy(lp, inputs, config, lengths):
    return -(lp * inputs["weights"]).sum(), {}


def importance_sampling(lp, inputs, config, lengths):
    ratio = torch.exp(lp - inputs["logprobs"])
    return -(ratio * inputs["advantages"]).sum(), {}


def ppo(lp, inputs, config, lengths):
    return _clipped_surrogate(torch.exp(lp - inputs["logprobs"]), inputs["advantages"], config)


def cispo(lp, inputs, config, lengths):
    ratio = torch.exp(lp - inputs["logprobs"]).detach()
    clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    loss = -(clipped * lp * inputs["advantages"]).sum()
    return loss, {"clip_fraction:mean": _fraction(clipped != ratio)}


def dro(lp, inputs, config, lengths):
    drift = lp - inputs["logprobs"]
    return -(lp * inputs["advantages"] - 0.5 * config["beta"] * drift * drift).sum(), {}


def gspo(lp, inputs, config, lengths):
    datum = torch.repeat_interleave(torch.arange(len(lengths), device=lp.device), lengths)
    in_ratio = (inputs["sequence_ratio_mask"] != 0).to(lp.dtype)
    log_ratio = (lp.detach() - inputs["logprobs"]) * in_ratio
    sums = lp.new_zeros(len(lengths)).index_add_(0, datum, log_ratio)
    counts = lp.new_zeros(len(lengths)).index_add_(0, datum, in_ratio)
    sequence_log_ratio = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    ratio = torch.exp(sequence_log_ratio[datum] + lp - lp.detach())
    return _clipped_surrogate(ratio, inputs["advantages"], config)


def stable_reinforce(lp, inputs, config, lengths):
    log_ratio = lp - inputs["logprobs"]
    ratio = torch.exp(log_ratio)
    weight = ratio.detach().clamp(max=config["clip_high_threshold"])
    kl = ratio - 1 - log_ratio  # k3: >= 0, and 0 with zero gradient where lp == q
    loss = -(weight * lp * inputs["advantages"]).sum() + config["kl_coeff"] * kl.sum()
    return loss, {"truncated_fraction:mean": _fraction(weight != ratio.detach()),
                  "kl:mean": kl.detach().mean().item() if kl.numel() else 0.0}


def _clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, config: dict[str, float]):
    clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    loss = -torch.minimum(ratio * advantages, clipped * advantages).sum()
    return loss, {"clip_fraction:mean": _fraction(clipped != ratio)}


def _fraction(mask: torch.Tensor) -> float:
    return mask.float().mean().item() if mask.numel() else 0.0


_GRADIENT_GATES: dict[str, str] = {
    "cross_entropy": "weights",
    "importance_sampling": "advantages",
    "ppo": "advantages",
    "cispo": "advantages",
    "gspo": "advantages",  # the sequence ratio is built from sg(lp): only A * grad(lp) flows
}


def gradient_gate(name: str, config: dict[str, float]) -> str | None:
    """The input that is zero wherever this loss's gradient with respect to lp is zero (the weight, or
    the advantage, multiplies every term the gradient flows through), or None. Training runs the
    unembedding's backward only where it is non-zero: prompt tokens of supervised data and of RL
    samples cost a forward only. dro has none (its drift term pulls on every token), nor has
    stable_reinforce with a KL penalty; without one it is sg(w) * lp * A."""
    if name == "stable_reinforce" and config["kl_coeff"] == 0:
        return "advantages"
    return _GRADIENT_GATES.get(name)


_FUNCTIONS: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
    "stable_reinforce": stable_reinforce,
}
assert set(_FUNCTIONS) == set(LOSS_INPUTS), "every loss of api.LOSS_INPUTS needs its function here"


@dataclass(frozen=True)
class LossDef:
    fn: LossFn
    required: tuple[str, ...]  # float inputs besides target_tokens
    optional: tuple[str, ...]  # float inputs that are all ones when missing
    soft_targets: bool  # accepts target_tokens [T, K] with weights [T, K]


def lookup(name: str) -> LossDef:
    spec = loss_spec(name)  # EngineError for unknown names
    return LossDef(_FUNCTIONS[name], tuple(k for k in spec.required if k != "target_tokens"), spec.optional,
                   spec.soft_targets)

