"""The built-in Tinker losses, on the learner's per-token target logprobs of one job.

Each loss sees the job's tokens flattened (all datums concatenated, no padding): `logprobs` is
[N] (or [N, K] for cross_entropy with soft targets) and every input has the same leading N.
Losses are sums over tokens, so a job's loss is the sum of its datums' losses, and the per-token
formulas below are the whole definition:

    cross_entropy        -lp * weight
    importance_sampling  -ratio * A                              ratio = exp(lp - sampler_lp)
    ppo                  -min(ratio * A, clip(ratio, lo, hi) * A)
    cispo                -stopgrad(clip(ratio, lo, hi)) * lp * A
    dro                  -(lp * A - beta / 2 * (lp - sampler_lp)^2)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .api import EngineError

Metrics = dict[str, float]


@dataclass(frozen=True)
class LossDef:
    fn: Callable[[torch.Tensor, dict[str, torch.Tensor], dict[str, float]], tuple[torch.Tensor, Metrics]]
    required: tuple[str, ...]  # inputs besides target_tokens
    optional: tuple[str, ...] = ()
    config: dict[str, float] = field(default_factory=dict)  # accepted loss_fn_config keys and defaults
    soft_targets: bool = False  # accepts target_tokens [T, K] with weights [T, K]


def cross_entropy(lp, inputs, config):
    return -(lp * inputs["weights"]).sum(), {}


def importance_sampling(lp, inputs, config):
    ratio = torch.exp(lp - inputs["logprobs"])
    return -(ratio * inputs["advantages"]).sum(), {}


def ppo(lp, inputs, config):
    advantages = inputs["advantages"]
    ratio = torch.exp(lp - inputs["logprobs"])
    clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    loss = -torch.minimum(ratio * advantages, clipped * advantages).sum()
    return loss, {"clip_fraction:mean": _fraction(clipped != ratio)}


def cispo(lp, inputs, config):
    ratio = torch.exp(lp - inputs["logprobs"]).detach()
    clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    loss = -(clipped * lp * inputs["advantages"]).sum()
    return loss, {"clip_fraction:mean": _fraction(clipped != ratio)}


def dro(lp, inputs, config):
    drift = lp - inputs["logprobs"]
    return -(lp * inputs["advantages"] - 0.5 * config["beta"] * drift * drift).sum(), {}


def _fraction(mask: torch.Tensor) -> float:
    return mask.float().mean().item() if mask.numel() else 0.0


_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
_RL_INPUTS = ("logprobs", "advantages")

LOSSES: dict[str, LossDef] = {
    "cross_entropy": LossDef(cross_entropy, required=(), optional=("weights",), soft_targets=True),
    "importance_sampling": LossDef(importance_sampling, required=_RL_INPUTS),
    "ppo": LossDef(ppo, required=_RL_INPUTS, config=_CLIP),
    "cispo": LossDef(cispo, required=_RL_INPUTS, config=_CLIP),
    "dro": LossDef(dro, required=_RL_INPUTS, config={"beta": 0.05}),
}
NOT_YET = ("gspo", "stable_reinforce", "custom")


def lookup(name: str) -> LossDef:
    if name in LOSSES:
        return LOSSES[name]
    if name in NOT_YET:
        raise EngineError(f"unsupported loss {name!r} (this server implements: {', '.join(LOSSES)})")
    raise EngineError(f"unknown loss {name!r} (known: {', '.join(LOSSES)})")


def resolve_config(name: str, loss: LossDef, config: dict[str, float | str] | None) -> dict[str, float]:
    """The loss_fn_config with defaults filled in. Keys this loss does not use are ignored (clients
    keep one config across losses); a key it uses must be a finite number."""
    resolved = dict(loss.config)
    for key, value in (config or {}).items():
        if key not in loss.config:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise EngineError(f"loss_fn_config[{key!r}] must be a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise EngineError(f"loss_fn_config[{key!r}] must be finite, got {value!r}")
        resolved[key] = number
    if "clip_low_threshold" in resolved and resolved["clip_low_threshold"] > resolved["clip_high_threshold"]:
        raise EngineError(f"loss {name!r}: clip_low_threshold must not exceed clip_high_threshold")
    return resolved
