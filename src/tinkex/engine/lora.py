"""Multi-tenant LoRA: many adapters on one frozen base model, mixed freely inside one batch.

Every targeted `nn.Linear` of the base model is replaced by a `LoraLinear` that keeps the original
module and a table of adapters. Before each forward the caller fills the shared `Routing` with
contiguous row ranges, one per adapter; each `LoraLinear` computes the frozen base output once for
the whole batch and adds `scale * x A^T B^T` to the rows of each adapter that targets this module.
Rows of one adapter are contiguous, so every delta works on a split of the batch and no rows are
gathered; adapters of different ranks and target sets mix freely. When a training batch is many
adapters of one rank with equal runs of rows (tenants sending batches of one shape), their deltas
are two batched matmuls over the stacked adapters instead of two matmuls per adapter.

The unembedding (`lm_head`) is wrapped even when no adapter trains it, because it is also where
the batch is cut down to the positions whose logits are wanted (`Routing.head_index`): the
training step only needs logits at real tokens, the sampler only at the last one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import gemm
from .api import LORA_ALPHA, LoraSpec

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULE = "lm_head"

Group = tuple[str, int, int]  # (adapter id, first row, row after the last)


@dataclass
class Routing:
    """Which adapter owns which rows, for the forward call about to run. Shared by all LoraLinears."""

    groups: list[Group] = field(default_factory=list)  # along dim 0 of every layer's input
    head_index: torch.Tensor | None = None  # flat [batch*time] positions the lm_head should keep
    head_groups: list[Group] = field(default_factory=list)  # along the kept positions

    def set(self, groups: list[Group], head_index: torch.Tensor | None = None,
            head_groups: list[Group] | None = None) -> None:
        self.groups = groups
        self.head_index = head_index
        self.head_groups = groups if head_groups is None else head_groups

    def clear(self) -> None:
        self.set([])


def groups_from_owners(owners: list[str | None]) -> list[Group]:
    """Contiguous runs of equal owners, e.g. [a, a, b, None] -> [(a, 0, 2), (b, 2, 3)]. None = base model."""
    groups: list[Group] = []
    start = 0
    for i in range(1, len(owners) + 1):
        if i == len(owners) or owners[i] != owners[start]:
            if owners[start] is not None:
                groups.append((owners[start], start, i))
            start = i
    return groups


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus any number of low-rank adapters, selected per row by `routing`."""

    def __init__(self, base: nn.Linear, routing: Routing, *, is_head: bool = False):
        super().__init__()
        self.base = base
        self.routing = routing
        self.is_head = is_head
        # adapter id -> (A [rank, in], B [out, rank], scale). A plain dict, not registered
        # parameters: model.parameters() stays the frozen base weights, however many tenants.
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.packable = False  # whether inference may keep a packed copy of the base weight (gemm.pack)
        self._packed: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some model code reads lm_head.weight (e.g. its dtype)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.routing
        groups = routing.groups
        if self.is_head and routing.head_index is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, routing.head_index)
            groups = routing.head_groups
        rows, shape = x.shape[0], (*x.shape[:-1], self.out_features)
        x = x.reshape(-1, x.shape[-1])  # [rows * positions, in]: every matmul below is 2-D
        out = self._base_output(x)
        runs = self._runs(groups, rows, x.shape[0] // max(rows, 1))
        if runs is None:
            return out.view(shape)
        if len(runs) == 1:  # one adapter owns every row: no cutting at all. In place: the base output
            # is not saved for the backward (a linear's needs its input), and at the head it is
            # [tokens, vocab], the biggest tensor of the forward.
            a, b, scale = runs[0][1]
            return gemm.add_linear(out, gemm.linear(x, a), b, scale, in_place=True).view(shape)
        if torch.is_grad_enabled() and _uniform(runs):  # training; decoding keeps the per-adapter
            # matmuls, which read each adapter's weights once where stacking them copies them every step
            return _add_grouped_delta(out, x, [lora for _, lora in runs]).view(shape)
        # Out of place, and cut with split rather than slices: the base output and the input are
        # split into runs of rows, each adapter's run gets its delta (one fused addmm), and the runs
        # are concatenated again. The backward of split and cat is one concatenation or view of
        # the gradient, where a slice's backward zero-fills a gradient the size of the whole batch,
        # once per adapter and module -- most of the cost of a many-tenant batch of short rows.
        sizes = [size for size, _ in runs]
        pieces = [o if lora is None else _add_delta(o, xi, *lora)
                  for o, xi, (_, lora) in zip(out.split(sizes), x.split(sizes), runs)]
        return torch.cat(pieces).view(shape)

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen projection of 2-D x: from the packed copy of the weight when nothing trains
        (made on first use), else gemm.linear."""
        weight = self.base.weight
        if self.packable and not torch.is_grad_enabled() and gemm.worth_onednn(x, weight):
            if self._packed is None:
                self._packed = gemm.pack(weight)
                self.packable = self._packed is not None
            if self._packed is not None:
                return gemm.packed_linear(x, self._packed, self.base.bias)
        return gemm.linear(x, weight, self.base.bias)

    def _runs(self, groups: list[Group], rows: int, positions: int) -> list[tuple[int, tuple | None]] | None:
        """The rows cut into runs, (flattened row count -- rows x `positions` per row --, this module's
        (A, B, scale) of their adapter, or None for rows with no delta here), in order; None when no
        row has a delta."""
        runs: list[tuple[int, tuple | None]] = []
        cursor = 0
        for adapter_id, start, stop in groups:
            lora = self.adapters.get(adapter_id)
            if lora is None:  # this adapter does not target this module
                continue
            if cursor < start:
                runs.append(((start - cursor) * positions, None))
            runs.append(((stop - start) * positions, lora))
            cursor = stop
        if not runs:
            return None
        if cursor < rows:
            runs.append(((rows - cursor) * positions, None))
        return runs


def _uniform(runs: list[tuple[int, tuple | None]]) -> bool:
    """Whether every run is an adapter's, all of one length, rank and scale: the adapters' deltas
    are then one batched matmul pair (many tenants sending batches of one shape)."""
    size, (a0, b0, scale0) = runs[0][0], runs[0][1] or (None, None, None)
    return a0 is not None and all(
        n == size and lora is not None and lora[0].shape == a0.shape and lora[1].shape == b0.shape and lora[2] == scale0
        for n, lora in runs)


def _add_grouped_delta(out: torch.Tensor, x: torch.Tensor, loras: list[tuple]) -> torch.Tensor:
    """out + scale * x_g A_g^T B_g^T for G equal runs of rows g, as two batched matmuls over the
    stacked adapters instead of two matmuls (and a split and a concatenation) per adapter."""
    groups, shape = len(loras), out.shape
    a = torch.stack([lora[0] for lora in loras])  # [G, rank, in]
    b = torch.stack([lora[1] for lora in loras])  # [G, out, rank]
    low_rank = torch.bmm(x.reshape(groups, -1, x.shape[-1]), a.transpose(1, 2))  # [G, rows, rank]
    grouped = torch.baddbmm(out.reshape(groups, -1, shape[-1]), low_rank, b.transpose(1, 2), alpha=loras[0][2])
    return grouped.view(shape)


def _add_delta(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """out + scale * (x @ A^T) @ B^T for 2-D out and x."""
    return gemm.add_linear(out, gemm.linear(x, a), b, scale)


def inject(model: nn.Module) -> tuple[Routing, dict[str, LoraLinear]]:
    """Replace the base model's target linears by LoraLinears; return the shared routing and
    {module path: LoraLinear}, the paths being the original ones (e.g. 'model.layers.0.self_attn.q_proj')."""
    routing = Routing()
    head = model.get_output_embeddings()
    wanted = set(ATTN_MODULES + MLP_MODULES)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and (module is head or name.rsplit(".", 1)[-1] in wanted)]
    if head is None or not any(module is head for _, module in targets):
        raise RuntimeError(f"{type(model).__name__} has no nn.Linear output embedding to wrap")
    wrapped: dict[str, LoraLinear] = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        is_head = module is head
        lora = LoraLinear(module, routing, is_head=is_head)
        setattr(parent, child, lora)
        wrapped[UNEMBED_MODULE if is_head else name] = lora
    return routing, wrapped


def module_kind(path: str) -> str:
    short = path.rsplit(".", 1)[-1]
    if short == UNEMBED_MODULE:
        return "unembed"
    return "attn" if short in ATTN_MODULES else "mlp"


def adapter_modules(spec: LoraSpec, modules: dict[str, LoraLinear]) -> list[str]:
    """Paths of the modules an adapter with this spec targets, in model order."""
    wanted = {"attn": spec.train_attn, "mlp": spec.train_mlp, "unembed": spec.train_unembed}
    return [path for path in modules if wanted[module_kind(path)]]


def init_weights(spec: LoraSpec, modules: dict[str, LoraLinear], device: torch.device,
                 seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fresh adapter weights: A as peft does (kaiming-uniform, bound 1/sqrt(in)), B = 0 so the
    adapter starts as the identity. A comes from a generator seeded with `seed` and walks the
    modules in model order, so the same seed gives the same adapter."""
    generator = torch.Generator().manual_seed(seed % (1 << 63))  # any 64-bit seed, negative too
    weights = {}
    for path in adapter_modules(spec, modules):
        module = modules[path]
        bound = 1.0 / math.sqrt(module.in_features)
        a = (torch.rand(spec.rank, module.in_features, generator=generator) * 2 - 1) * bound
        b = torch.zeros(module.out_features, spec.rank)
        weights[path] = (a.to(device), b.to(device))
    return weights


def attach(adapter_id: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
           modules: dict[str, LoraLinear], *, trainable: bool) -> list[torch.Tensor]:
    """Register an adapter's weights in its modules; returns its parameters as [A0, B0, A1, B1, ...]."""
    params = []
    for path, (a, b) in weights.items():
        a = a.detach().requires_grad_(trainable)
        b = b.detach().requires_grad_(trainable)
        modules[path].adapters[adapter_id] = (a, b, scale)
        params += [a, b]
    return params


def detach(adapter_id: str, modules: dict[str, LoraLinear]) -> None:
    for module in modules.values():
        module.adapters.pop(adapter_id, None)


def default_scale(rank: int) -> float:
    return LORA_ALPHA / rank
