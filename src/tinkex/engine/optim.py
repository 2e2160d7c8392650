"""AdamW per adapter, with the hyperparameters of each call (Tinker sends them with every step).

Each trainable adapter owns a `torch.optim.AdamW` (fused kernel where the build has one, else the
foreach one) over its own A/B tensors, so adapters never share moments or step counts. Global
gradient-norm clipping runs over that adapter's gradients only.
"""

from __future__ import annotations

import math

import torch

from .api import AdamHyper, EngineError

STATE_KEYS = ("exp_avg", "exp_avg_sq")


def validate(hyper: AdamHyper) -> None:
    def bad(field: str, rule: str) -> EngineError:
        return EngineError(f"adam params: {field}={getattr(hyper, field)!r} must be {rule}")

    for field in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
        value = getattr(hyper, field)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(field, "a finite number")
    if hyper.learning_rate < 0:
        raise bad("learning_rate", ">= 0")
    for field in ("beta1", "beta2"):
        if not 0 <= getattr(hyper, field) < 1:
            raise bad(field, "in [0, 1)")
    if hyper.eps <= 0:
        raise bad("eps", "> 0")
    if hyper.weight_decay < 0:
        raise bad("weight_decay", ">= 0")
    if hyper.grad_clip_norm < 0:
        raise bad("grad_clip_norm", ">= 0 (0 disables clipping)")


def _make_adamw(params: list[torch.Tensor]) -> torch.optim.AdamW:
    try:
        return torch.optim.AdamW(params, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, foreach=True)


class AdapterOptimizer:
    """The optimizer state of one adapter: Adam moments and the step count."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self._adamw = _make_adamw(params)

    @property
    def step_count(self) -> int:
        state = self._adamw.state.get(self.params[0]) if self.params else None
        return int(state["step"]) if state else 0

    def step(self, hyper: AdamHyper) -> dict[str, float]:
        validate(hyper)
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:  # no forward_backward since the last step: nothing to apply (as torch's AdamW)
            return {"grad_norm:mean": 0.0}
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item()
        if not math.isfinite(norm):
            self.zero_grad()
            raise EngineError("the gradient is not finite (nan or inf); the step was skipped and the gradient cleared")
        if hyper.grad_clip_norm > 0:
            # As torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when above it.
            coef = hyper.grad_clip_norm / (norm + 1e-6)
            if coef < 1:
                torch._foreach_mul_(grads, coef)
        for group in self._adamw.param_groups:
            group.update(lr=hyper.learning_rate, betas=(hyper.beta1, hyper.beta2), eps=hyper.eps,
                         weight_decay=hyper.weight_decay)
        self._adamw.step()
        self.zero_grad()
        return {"grad_norm:mean": norm}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_tensors(self) -> tuple[list[dict[str, torch.Tensor]] | None, int]:
        """Per parameter {exp_avg, exp_avg_sq} in parameter order, and the step; None before the first step."""
        if self.step_count == 0:
            return None, 0
        return [{k: self._adamw.state[p][k] for k in STATE_KEYS} for p in self.params], self.step_count

    def load_state_tensors(self, moments: list[dict[str, torch.Tensor]], step: int) -> None:
        """Restore what state_tensors returned, so that the next step is the one the saver would take."""
        if step == 0:
            return
        for p, state in zip(self.params, moments, strict=True):
            self._adamw.state[p] = {
                # Fused and foreach AdamW keep `step` as a float32 tensor beside the parameter.
                "step": torch.tensor(float(step), dtype=torch.float32, device=p.device)
                if self._adamw.defaults.get("fused") else torch.tensor(float(step), dtype=torch.float32),
                **{k: state[k].to(device=p.device, dtype=p.dtype).clone() for k in STATE_KEYS},
            }
