"""Idle adapters leave the fast memory: a budget of resident adapters, least recently used out first.

A resident adapter has its LoRA tensors in the base model's LoraLinear tables, on the engine's
device, and (if trainable) an AdamW over them. When more adapters are resident than the budget
allows, the least recently used ones that no running work needs are *parked*: their weights,
pending gradients and Adam moments are copied out -- to a file in the spill directory, or, without
one, to CPU tensors (which frees an accelerator, though not the RAM of a CPU-only engine) -- and
dropped from the modules, the optimizer and the device. The next use unparks the adapter exactly as
it was, so parking never changes a result; it only costs the copy.
"""

from __future__ import annotations

import os
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

Weights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A, B)
Moments = list[dict[str, torch.Tensor]]  # per parameter (A, B, A, B, ...): exp_avg, exp_avg_sq


@dataclass
class Parked:
    """Everything needed to put an adapter back: its tensors in memory, or the file holding them."""

    tensors: dict[str, torch.Tensor] | None
    path: Path | None
    step: int  # the optimizer's step count


def park(weights: Weights, moments: Moments | None, step: int, spill_path: Path | None) -> Parked:
    tensors: dict[str, torch.Tensor] = {}
    params = [(f"{path}.{which}", t) for path, pair in weights.items() for which, t in zip("AB", pair)]
    for i, (name, tensor) in enumerate(params):
        tensors[name] = tensor.detach()
        if tensor.grad is not None:  # a forward_backward since the last optim_step
            tensors[f"{name}.grad"] = tensor.grad
        if moments is not None:
            for key, value in moments[i].items():
                tensors[f"{name}.{key}"] = value
    if spill_path is None:
        return Parked({k: v.to("cpu") for k, v in tensors.items()}, None, step)
    spill_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = spill_path.with_name(f".{spill_path.name}.{uuid.uuid4().hex}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, spill_path)  # a crash never leaves a half-written spill file under the real name
    return Parked(None, spill_path, step)


def unpark(parked: Parked, paths: Iterable[str], device: torch.device,
           ) -> tuple[Weights, dict[str, torch.Tensor], Moments | None, int]:
    """(weights, gradients by "path.A"/"path.B", moments or None, step); deletes the spill file."""
    tensors = parked.tensors if parked.path is None else load_file(parked.path)
    tensors = {k: v.to(device) for k, v in tensors.items()}
    discard(parked)
    weights, grads, moments = {}, {}, []
    for path in paths:
        weights[path] = (tensors[f"{path}.A"], tensors[f"{path}.B"])
        for which in "AB":
            name = f"{path}.{which}"
            if f"{name}.grad" in tensors:
                grads[name] = tensors[f"{name}.grad"]
            if f"{name}.exp_avg" in tensors:
                moments.append({key: tensors[f"{name}.{key}"] for key in ("exp_avg", "exp_avg_sq")})
    return weights, grads, (moments or None), parked.step


def discard(parked: Parked) -> None:
    if parked.path is not None:
        parked.path.unlink(missing_ok=True)
    parked.tensors = None


class LRU:
    """The resident adapters, least recently used first, and which of them must leave."""

    def __init__(self, budget: int | None):
        if budget is not None and budget < 1:
            raise ValueError("the resident adapter budget must be at least 1 (None: no limit)")
        self.budget = budget
        self._order: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def touch(self, adapter_id: str) -> None:
        self._order[adapter_id] = None
        self._order.move_to_end(adapter_id)

    def discard(self, adapter_id: str) -> None:
        self._order.pop(adapter_id, None)

    def to_park(self, pinned: set[str]) -> list[str]:
        """The least recently used adapters to park so the resident ones fit the budget. Pinned ones
        (needed by running work) stay, even if that leaves the budget exceeded for a while."""
        if self.budget is None:
            return []
        excess = len(self._order) - self.budget
        return [a for a in self._order if a not in pinned][:max(0, excess)]
