"""Composable regularizers for `TrainingClient.forward_backward_custom`.

`RegularizedLoss(base, [terms...])` is a custom loss: `forward_backward_custom` calls it with the
per-datum target logprobs (torch tensors that require grad), and it returns

    total = base(data, logprobs) + sum(weight_i * term_i(data, logprobs))

together with per-term metrics: each term's value, weighted contribution, its own metrics and,
with `track_grad_norms=True`, the L2 norm of its gradient with respect to the logprobs (also
weighted, plus the base's and the total's). The SDK sends `-dtotal/dlogprobs` back as the
weights of a cross-entropy pass, so the model trains on the whole combination.

    from tinkex.client import regularizers as R
    loss = R.RegularizedLoss("cross_entropy", [
        R.l2(1e-3), R.entropy(0.01, mode="maximize"), R.kl(0.1, reference="reference_logprobs"),
        R.Regularizer(my_penalty, weight=0.5, name="mine"),
    ], track_grad_norms=True)
    out = trainer.forward_backward_custom(data, loss).result()
    out.metrics["reg/kl/value"], out.metrics["reg/kl/grad_norm"], loss.last.regularizer_total

Terms run in parallel in a thread pool (torch releases the GIL in its kernels); an `async def` term
is awaited, all of them concurrently, so a term that waits on I/O (a reward model, a solver) does
not hold up the others. Each term is a function `(data, logprobs) -> tensor` or
`-> (tensor, {metric: float})`; non-scalar results are summed.

Token masks: built-in terms look at the positions whose `loss_fn_inputs["weights"]` is positive
(all positions when a datum has no weights); `mask=None` uses every position.

What the built-ins compute, all over the per-token target logprobs `lp` (the SDK sees only the
logprob of each target token, not the full distribution):

| term | value |
|---|---|
| `l1` | sum (or mean) of `abs(lp)` (`target="probs"`: of `exp(lp)`) |
| `l2` | sum (or mean) of `lp**2` (`center="mean"`: of `(lp - mean(lp))**2`) |
| `elastic_net` | `l1_ratio * l1 + (1 - l1_ratio) * l2` |
| `entropy` | the Monte-Carlo entropy estimate `mean(-lp)` (exact in expectation when the targets were sampled from the model); `mode="maximize"` adds `-H`, `"minimize"` adds `+H` |
| `kl` | KL(policy ‖ reference) per token from `r = ref_lp - lp`, with the k1 (`-r`), k2 (`r**2 / 2`) or k3 (`exp(r) - 1 - r`, default) estimator; the reference logprobs come from a `loss_fn_inputs` field or a callable |
| `consistency` | mean squared (or absolute) difference between `lp` and a paired field, e.g. logprobs of the same targets under a perturbed prompt |
| `orthogonality` | mean squared off-diagonal entry of the Gram matrix of the L2-normalised per-datum logprob vectors: pushes the datums' profiles apart |
| `gradient_penalty` | `(‖d base / d lp‖ - target_norm)**2` (or `‖.‖**2` with `target_norm=None`) |
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from . import metrics as _metrics
from . import telemetry as _telemetry

if TYPE_CHECKING:
    import torch

    from ..types import Datum

TermFn = Callable[..., Any]
_RESERVED = frozenset({"value", "contribution", "grad_norm", "grad_norm_weighted"})
Mask = Literal["weights"] | None


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ImportError("regularizers need PyTorch: pip install torch") from exc
    return torch


# ---- one term -----------------------------------------------------------------------------------


@dataclass
class Regularizer:
    """A weighted term. `fn(data, logprobs)` (or `fn(data, logprobs, base_loss)` with `needs_base`)."""

    fn: TermFn
    weight: float = 1.0
    name: str | None = None
    timeout_s: float | None = None  # for async terms and parallel runs
    needs_base: bool = False  # fn takes the base loss tensor as a third argument (runs after it)

    def __post_init__(self) -> None:
        if self.weight < 0 or not math.isfinite(self.weight):
            raise ValueError(f"a regularizer weight must be finite and >= 0, got {self.weight}")
        if self.name is None:
            self.name = getattr(self.fn, "__name__", None) or type(self.fn).__name__
        if not self.name or "/" in self.name:
            raise ValueError(f"invalid regularizer name {self.name!r}")

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn) or inspect.iscoroutinefunction(getattr(self.fn, "__call__", None))


@dataclass
class TermOutput:
    name: str
    value: float
    weight: float
    contribution: float
    metrics: dict[str, float] = field(default_factory=dict)
    grad_norm: float | None = None
    grad_norm_weighted: float | None = None
    duration_s: float = 0.0


@dataclass
class RegularizedLossOutput:
    loss_total: float
    base_loss: float
    base_metrics: dict[str, float]
    regularizers: dict[str, TermOutput]
    regularizer_total: float
    base_grad_norm: float | None = None
    total_grad_norm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _split(result: Any) -> tuple[Any, dict[str, float]]:
    torch = _torch()
    metrics: Mapping[str, Any] = {}
    if isinstance(result, tuple):
        result, metrics = result[0], (result[1] if len(result) > 1 else {})
    if not isinstance(result, torch.Tensor):
        result = torch.as_tensor(float(result))
    if result.numel() != 1:
        result = result.sum()
    return result.reshape(()), {str(k): float(v) for k, v in dict(metrics or {}).items()}


async def _await_all(calls: list[tuple[int, Regularizer, tuple[Any, ...]]]) -> list[Any]:
    async def one(reg: Regularizer, args: tuple[Any, ...]) -> Any:
        return await asyncio.wait_for(reg.fn(*args), reg.timeout_s)

    return await asyncio.gather(*(one(reg, args) for _, reg, args in calls), return_exceptions=True)


# ---- the combination ----------------------------------------------------------------------------


class RegularizedLoss:
    """A custom loss: `base` plus weighted regularizers (see the module docs)."""

    def __init__(self, base: TermFn | Literal["cross_entropy"] | None, regularizers: Sequence[Regularizer] = (), *,
                 track_grad_norms: bool = False, parallel: bool = True, max_workers: int | None = None):
        names = [r.name for r in regularizers]
        if len(set(names)) != len(names):
            raise ValueError(f"regularizer names must be unique, got {names}")
        if base == "cross_entropy":
            base = cross_entropy
        self.base = base
        self.regularizers = list(regularizers)
        self.track_grad_norms = track_grad_norms
        self.parallel = parallel
        self.max_workers = max_workers
        self.last: RegularizedLossOutput | None = None

    def __call__(self, data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        torch = _torch()
        started = time.perf_counter()
        with _telemetry.span(_telemetry.CUSTOM_LOSS, regularizer_count=len(self.regularizers),
                             track_grad_norms=self.track_grad_norms, datums=len(data)) as attrs:
            if self.base is None:
                base, base_metrics = torch.zeros(()), {}
            else:
                base, base_metrics = _split(self.base(data, logprobs))
            values, durations = self._compute_terms(data, logprobs, base)
            total = base
            terms: dict[str, TermOutput] = {}
            for reg in self.regularizers:
                value, metrics = values[reg.name]
                total = total + reg.weight * value
                terms[reg.name] = TermOutput(name=reg.name, value=float(value.detach()), weight=reg.weight,
                                             contribution=reg.weight * float(value.detach()), metrics=metrics,
                                             duration_s=durations[reg.name])
            base_norm = total_norm = None
            if self.track_grad_norms:
                base_norm = _grad_norm(base, logprobs)
                for reg in self.regularizers:
                    norm = _grad_norm(values[reg.name][0], logprobs)
                    terms[reg.name].grad_norm = norm
                    terms[reg.name].grad_norm_weighted = reg.weight * norm
                total_norm = _grad_norm(total, logprobs)
            reg_total = sum(t.contribution for t in terms.values())
            self.last = RegularizedLossOutput(loss_total=float(total.detach()), base_loss=float(base.detach()),
                                              base_metrics=base_metrics, regularizers=terms,
                                              regularizer_total=reg_total, base_grad_norm=base_norm,
                                              total_grad_norm=total_norm)
            attrs.update(loss_total=self.last.loss_total, regularizer_total=reg_total)
            for term in terms.values():
                _telemetry.emit(_telemetry.REGULARIZER, duration_s=term.duration_s, name=term.name,
                                weight=term.weight, value=term.value, contribution=term.contribution,
                                grad_norm=term.grad_norm)
        _metrics.REGISTRY.observe("tinkex_custom_loss_duration_seconds", time.perf_counter() - started)
        return total, self._metrics(self.last)

    @staticmethod
    def _metrics(out: RegularizedLossOutput) -> dict[str, float]:
        metrics = {"base_loss": out.base_loss, "regularizer_total": out.regularizer_total,
                   "loss_total": out.loss_total}
        metrics.update({f"base/{k}": v for k, v in out.base_metrics.items()})
        for name, term in out.regularizers.items():
            metrics[f"reg/{name}/value"] = term.value
            metrics[f"reg/{name}/contribution"] = term.contribution
            for key, value in term.metrics.items():  # a term's own metric never hides a reported one
                metrics[f"reg/{name}/{key}{'_metric' if key in _RESERVED else ''}"] = value
            if term.grad_norm is not None:
                metrics[f"reg/{name}/grad_norm"] = term.grad_norm
                metrics[f"reg/{name}/grad_norm_weighted"] = term.grad_norm_weighted  # type: ignore[assignment]
        if out.base_grad_norm is not None:
            metrics["base/grad_norm"] = out.base_grad_norm
        if out.total_grad_norm is not None:
            metrics["total/grad_norm"] = out.total_grad_norm
        return metrics

    def _compute_terms(self, data: list[Datum], logprobs: list[torch.Tensor], base: torch.Tensor
                       ) -> tuple[dict[str, tuple[Any, dict[str, float]]], dict[str, float]]:
        results: dict[str, Any] = {}
        durations: dict[str, float] = {}

        def args_for(reg: Regularizer) -> tuple[Any, ...]:
            return (data, logprobs, base) if reg.needs_base else (data, logprobs)

        def timed(reg: Regularizer) -> Any:
            started = time.perf_counter()
            try:
                return reg.fn(*args_for(reg))
            finally:
                durations[reg.name] = time.perf_counter() - started

        sync = [r for r in self.regularizers if not r.is_async]
        async_calls = [(i, r, args_for(r)) for i, r in enumerate(self.regularizers) if r.is_async]
        pool = None
        futures: dict[str, concurrent.futures.Future[Any]] = {}
        try:
            if self.parallel and len(sync) + bool(async_calls) > 1:
                pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.max_workers or min(8, len(sync) or 1),
                                                             thread_name_prefix="tinkex-regularizer")
                futures = {r.name: pool.submit(timed, r) for r in sync}
            else:
                for reg in sync:
                    results[reg.name] = timed(reg)
            if async_calls:
                started = time.perf_counter()
                outcomes = asyncio.run(_await_all(async_calls))
                for (_, reg, _), outcome in zip(async_calls, outcomes):
                    durations[reg.name] = time.perf_counter() - started
                    if isinstance(outcome, BaseException):
                        raise RuntimeError(f"regularizer {reg.name!r} failed: {outcome!r}") from outcome
                    results[reg.name] = outcome
            for reg in sync:
                if reg.name in futures:
                    try:
                        results[reg.name] = futures[reg.name].result(reg.timeout_s)
                    except concurrent.futures.TimeoutError:
                        raise TimeoutError(f"regularizer {reg.name!r} took over {reg.timeout_s} s") from None
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        out = {}
        for reg in self.regularizers:
            try:
                out[reg.name] = _split(results[reg.name])
            except Exception as exc:
                raise TypeError(f"regularizer {reg.name!r} returned {type(results[reg.name]).__name__}; "
                                "expected a tensor or (tensor, metrics)") from exc
        return out, durations


def _grad_norm(value: torch.Tensor, logprobs: list[torch.Tensor]) -> float:
    torch = _torch()
    if not value.requires_grad:
        return 0.0
    grads = torch.autograd.grad(value, logprobs, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float((g.detach() ** 2).sum()) for g in grads if g is not None))


# ---- helpers ------------------------------------------------------------------------------------


def _field(datum: Datum, name: str) -> torch.Tensor:
    torch = _torch()
    if name not in datum.loss_fn_inputs:
        raise KeyError(f"this regularizer reads loss_fn_inputs[{name!r}], which a datum lacks")
    return torch.as_tensor(datum.loss_fn_inputs[name].to_numpy(), dtype=torch.float32)


def _mask(datum: Datum, lp: torch.Tensor, mask: Mask) -> torch.Tensor:
    torch = _torch()
    if mask == "weights" and "weights" in datum.loss_fn_inputs:
        weights = _field(datum, "weights").reshape(lp.shape)
        return weights > 0
    return torch.ones(lp.shape, dtype=torch.bool)


def masked(data: Sequence[Datum], logprobs: Sequence[torch.Tensor], mask: Mask = "weights",
           other: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every datum's selected logprobs concatenated (and the same positions of field `other`)."""
    torch = _torch()
    picked, paired = [], []
    for datum, lp in zip(data, logprobs):
        keep = _mask(datum, lp, mask)
        picked.append(lp[keep])
        if other is not None:
            paired.append(_field(datum, other).reshape(lp.shape)[keep])
    if not picked:
        return torch.zeros(0), (torch.zeros(0) if other is not None else None)
    return torch.cat(picked), (torch.cat(paired) if other is not None else None)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    torch = _torch()
    if values.numel() == 0:
        return torch.zeros(())
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', not {reduction!r}")


def cross_entropy(data: Sequence[Datum], logprobs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The server's cross_entropy: sum over tokens of -logprob * weight (weights 1 when absent)."""
    torch = _torch()
    total = torch.zeros(())
    for datum, lp in zip(data, logprobs):
        weights = _field(datum, "weights").reshape(lp.shape) if "weights" in datum.loss_fn_inputs \
            else torch.ones(lp.shape)
        total = total + (-lp * weights).sum()
    return total, {}


# ---- built-in terms -----------------------------------------------------------------------------


def l1(weight: float = 1.0, *, target: Literal["logprobs", "probs"] = "logprobs",
       reduction: Literal["sum", "mean"] = "sum", mask: Mask = "weights", name: str = "l1") -> Regularizer:
    def l1_term(data: Sequence[Datum], logprobs: Sequence[torch.Tensor]) -> Any:
        values, _ = masked(data, logprobs, mask)
        values = values.exp() if target == "probs" else values
        return _reduce(values.abs(), reduction)

    return Regularizer(l1_term, weight, name)


def l2(weight: float = 1.0, *, target: Literal["logprobs", "probs"] = "logprobs",
       reduction: Literal["sum", "mean"] = "sum", center: Literal["mean"] | None = None, mask: Mask = "weights",
       name: str = "l2") -> Regularizer:
    def l2_term(data: Sequence[Datum], logprobs: Sequence[torch.Tensor]) -> Any:
        values, _ = masked(data, logprobs, mask)
        values = values.exp() if target == "probs" else values
        if center == "mean" and values.numel():
            values = values - values.mean()
        return _reduce(values ** 2, reduction)

    return Regularizer(l2_term, weight, name)


def elastic_net(weight: float = 1.0, *, l1_ratio: float = 0.5, target: Literal["logprobs", "probs"] = "logprobs",
                reduction: Literal["sum", "mean"] = "sum", mask: Mask = "weights",
                name: str = "elastic_net") -> Regularizer:
    if not 0 <= l1_ratio <= 1:
        raise ValueError("l1_ratio must be in [0, 1]")

    def elastic_net_term(data: Sequence[Datum], logprobs: Sequence[torch.Tensor]) -> Any:
        values, _ = masked(data, logprobs, mask)
        values = values.exp() if target == "probs" else values
        l1_part, l2_part = _reduce(values.abs(), reduction), _reduce(values ** 2, reduction)
        return l1_ratio * l1_part + (1 - l1_ratio) * l2_part, {"l1": float(l1_part.detach()),
                                                               "l2": float(l2_part.detach())}

    return Regularizer(elastic_net_term, weight, name)


def entropy(weight: float = 1.0, *, mode: Literal["maximize", "minimize"] = "maximize", mask: Mask = "weights",
            name: str = "entropy") -> Regularizer:
    if mode not in ("maximize", "minimize"):
        raise ValueError("mode must be 'maximize' or 'minimize'")

    def entropy_term(data: Sequence[Datum], logprobs: Sequence[torch.Tensor]) -> Any:
        values, _ = masked(data, logprobs, mask)
        estimate = _reduce(-values, "mean")
        return (-estimate if mode == "maximize" else estimate), {"entropy": float(estimate.detach())}

    return Regularizer(entropy_term, weight, name)


def kl(weight: float = 1.0, *, reference: str | Callable[[Sequence[Datum]], Sequence[Any]] = "reference_logprobs",
       estimator: Literal["k1", "k2", "k3"] = "k3", reduction: Literal["sum", "mean"] = "mean",
       mask: Mask = "weights", name: str = "kl") -> Regularizer:
    """KL(policy ‖ reference) per target token; `reference` is a loss_fn_inputs field of reference
    logprobs (same shape as target_tokens) or `fn(data) -> [per-datum logprobs]`."""
    if estimator not in ("k1", "k2", "k3"):
        raise ValueError("estimator must be k1, k2 or k3")

    def kl_term(data: Sequence[Datum], logprobs: Sequence[torch.Tensor]) -> Any:
        torch = _torch()
        if isinstance(reference, str):
            values, ref = masked(data, logprobs, mask, other=reference)
        else:
            refs = list(reference(data))
            picked, paired = [], []
            for datum, lp, ref_lp in zip(data, logprobs, refs):
                keep = _mask(datum, lp, mask)
                picked.append(lp[keep])
                paired.append(torch.as_tensor(ref_lp, dtype=torch.float32).reshape(lp.shape)[keep])
            values, ref = torch.cat(picked), torch.cat(paired)
        assert ref is not None
        r = ref - values  # log(reference / policy)
        if estimator == "k1":
            per_token = -r
        elif estimator == "k2":
            per_token = 0.5 * r ** 2
        else:
            per_token = torch.expm1(r) - r
        return _reduce(per_token, reduction)

    return Regularizer(kl_term, weight, name)


def consistency(weight: float = 1.0, *, pair_field: str = "original_logprobs",
                metric: Literal["mse", "l1"] = "mse", reduction: Literal["sum", "mean"] = "mean",
                mask: Mask = "weights", name: str = "consistency") -> Regularizer:
    if metric not in ("mse", "l1"):
        raise ValueError("metric must be 'mse' or 'l1'")

    def consistency_term(data: Sequence[Datum], logprobs: Sequence[torch.Tensor]) -> Any:
        values, paired = masked(data, logprobs, mask, other=pair_field)
        assert paired is not None
        diff = values - paired
        return _reduce(diff ** 2 if metric == "mse" else diff.abs(), reduction)

    return Regularizer(consistency_term, weight, name)


def orthogonality(weight: float = 1.0, *, mask: Mask = "weights", name: str = "orthogonality") -> Regularizer:
    def orthogonality_term(data: Sequence[Datum], logprobs: Sequence[torch.Tensor]) -> Any:
        torch = _torch()
        rows = [lp[_mask(d, lp, mask)].reshape(-1) for d, lp in zip(data, logprobs)]
        if len(rows) < 2:
            return torch.zeros(())
        width = max(row.numel() for row in rows)
        matrix = torch.stack([torch.nn.functional.pad(row, (0, width - row.numel())) for row in rows])
        matrix = matrix / matrix.norm(dim=1, keepdim=True).clamp_min(1e-12)
        gram = matrix @ matrix.T
        off = gram - torch.diag(torch.diagonal(gram))
        n = len(rows)
        return (off ** 2).sum() / (n * (n - 1))

    return Regularizer(orthogonality_term, weight, name)


def gradient_penalty(weight: float = 1.0, *, target_norm: float | None = 1.0,
                     name: str = "gradient_penalty") -> Regularizer:
    """A penalty on the norm of the base loss's gradient with respect to the logprobs."""

    def gradient_penalty_term(data: Sequence[Datum], logprobs: Sequence[torch.Tensor], base: torch.Tensor) -> Any:
        torch = _torch()
        if not base.requires_grad:
            return torch.zeros(())
        grads = torch.autograd.grad(base, list(logprobs), create_graph=True, allow_unused=True)
        squared = sum(((g ** 2).sum() for g in grads if g is not None), torch.zeros(()))
        norm = torch.sqrt(squared + 1e-12)
        value = (norm - target_norm) ** 2 if target_norm is not None else squared
        return value, {"base_grad_norm": float(norm.detach())}

    return Regularizer(gradient_penalty_term, weight, name, needs_base=True)

