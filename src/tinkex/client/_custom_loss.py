"""Custom losses computed on the client over per-datum logprobs.

`forward_backward_custom(data, loss_fn)` runs:
1. a forward pass (cross_entropy, forward_only) that returns each datum's target logprobs;
2. the user's loss on torch leaf tensors made from those logprobs, then `loss.backward()`;
3. a forward_backward pass with cross_entropy and `weights = -dLoss/dlogprobs`: the server's
   loss `sum(-logprob * weight)` then has the same gradient as the custom loss.

`create_custom_loss(fn, input_ranks)` traces a per-datum loss with torch.fx into a LossHandle;
a handle without a server `loss_id` runs client-side in the same way, summing per-datum losses.
torch is imported only when one of these is used.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Concatenate, TypeAlias

import numpy as np

from ..types import CustomLossInput, Datum, TensorData

if TYPE_CHECKING:
    import torch
    import torch.fx

PerDatumLossFn: TypeAlias = Callable[Concatenate["torch.Tensor", ...], tuple["torch.Tensor", Mapping[str, "torch.Tensor"]]]
CustomLossFnV1: TypeAlias = Callable[[list[Datum], list["torch.Tensor"]], tuple["torch.Tensor", dict[str, float]]]

_INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
_MAX_INPUTS = 16


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ImportError("custom losses need PyTorch: pip install torch") from exc
    return torch


@dataclass(frozen=True)
class LossHandle:
    """A traced per-datum loss (see `ServiceClient.create_custom_loss`)."""

    name: str
    inputs: tuple[CustomLossInput, ...]
    session_id: str
    graph: torch.fx.GraphModule = field(repr=False, compare=False)
    loss_id: str | None = None

    @property
    def key(self) -> str:
        digest = hashlib.sha256(self.graph.code.encode())
        digest.update(repr(self.inputs).encode())
        return digest.hexdigest()

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(item.name for item in self.inputs[1:])


def trace_loss(fn: PerDatumLossFn, input_ranks: Mapping[str, int], session_id: str) -> LossHandle:
    """Check the signature and trace `fn` with torch.fx."""
    torch = _torch()
    import torch.fx  # noqa: F401

    params = list(inspect.signature(fn).parameters.values())
    if not params or params[0].name != "logprobs":
        raise ValueError("a custom loss takes `logprobs` as its first parameter")
    if len(params) > _MAX_INPUTS:
        raise ValueError(f"a custom loss takes at most {_MAX_INPUTS} parameters")
    for param in params:
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD) or param.default is not param.empty:
            raise ValueError(f"parameter {param.name!r}: plain positional parameters without defaults only")
        if not _INPUT_NAME.fullmatch(param.name):
            raise ValueError(f"parameter name {param.name!r} must match {_INPUT_NAME.pattern}")
    names = [param.name for param in params]
    if set(input_ranks) != set(names):
        raise ValueError(f"input_ranks must list exactly the parameters {names}, got {sorted(input_ranks)}")
    for name, rank in input_ranks.items():
        if rank not in (0, 1, 2):
            raise ValueError(f"rank of {name!r} must be 0, 1 or 2")
    if input_ranks["logprobs"] not in (1, 2):
        raise ValueError("logprobs has rank 1 or 2")
    graph = torch.fx.symbolic_trace(fn)
    inputs = tuple(CustomLossInput(name=name, rank=input_ranks[name]) for name in names)
    return LossHandle(name=getattr(fn, "__name__", "loss"), inputs=inputs, session_id=session_id, graph=graph)


def run_loss_handle(handle: LossHandle, data: Sequence[Datum], logprobs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The handle's loss summed over datums; `:mean` metrics averaged and `:sum` metrics summed."""
    torch = _torch()
    total = None
    sums: dict[str, float] = {}
    for datum, lp in zip(data, logprobs):
        args = []
        for item in handle.inputs[1:]:
            if item.name not in datum.loss_fn_inputs:
                raise ValueError(f"the custom loss reads loss_fn_inputs[{item.name!r}], which a datum lacks")
            tensor = datum.loss_fn_inputs[item.name].to_torch()
            if tensor.ndim != item.rank:
                raise ValueError(f"loss_fn_inputs[{item.name!r}] has rank {tensor.ndim}, declared {item.rank}")
            args.append(tensor)
        loss, metrics = handle.graph(lp, *args)
        total = loss if total is None else total + loss
        for key, value in dict(metrics).items():
            if not _METRIC_KEY.fullmatch(key):
                raise ValueError(f"custom loss metric {key!r} must match {_METRIC_KEY.pattern}")
            sums[key] = sums.get(key, 0.0) + float(value)
    count = max(1, len(data))
    metrics_out = {key: (value / count if key.endswith(":mean") else value) for key, value in sums.items()}
    return (total if total is not None else torch.zeros(())), metrics_out


def forward_data(data: Sequence[Datum]) -> list[Datum]:
    """The forward pass's input: model_input, target_tokens and weights (zeros when missing)."""
    out = []
    for datum in data:
        if "target_tokens" not in datum.loss_fn_inputs:
            raise ValueError("forward_backward_custom needs loss_fn_inputs['target_tokens'] in every datum")
        targets = datum.loss_fn_inputs["target_tokens"]
        weights = datum.loss_fn_inputs.get("weights")
        if weights is None:
            weights = TensorData.from_numpy(np.zeros(targets.to_numpy().shape, dtype=np.float32))
        out.append(Datum(model_input=datum.model_input,
                         loss_fn_inputs={"target_tokens": targets, "weights": weights}))
    return out


def leaf_logprobs(outputs: Sequence[dict[str, TensorData]], data: Sequence[Datum]) -> list[torch.Tensor]:
    torch = _torch()
    tensors = []
    for output, datum in zip(outputs, data):
        array = output["logprobs"].to_numpy().astype(np.float32)
        target_shape = datum.loss_fn_inputs["target_tokens"].to_numpy().shape
        if array.size == int(np.prod(target_shape)):
            array = array.reshape(target_shape)
        tensors.append(torch.tensor(array, dtype=torch.float32, requires_grad=True))
    return tensors


def compute_custom_loss(
    loss_fn: CustomLossFnV1 | LossHandle, data: Sequence[Datum], logprobs: list[torch.Tensor]
) -> tuple[float, dict[str, float], list[np.ndarray]]:
    """Run the user's loss and its backward; return (loss value, user metrics, -dLoss/dlogprobs per datum)."""
    torch = _torch()
    if isinstance(loss_fn, LossHandle):
        loss, metrics = run_loss_handle(loss_fn, data, logprobs)
    else:
        loss, metrics = loss_fn(list(data), logprobs)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("the custom loss must return a scalar torch tensor as its first value")
    loss.backward()
    weights = []
    for lp in logprobs:
        grad = lp.grad if lp.grad is not None else torch.zeros_like(lp)
        weights.append((-grad).detach().cpu().numpy().astype(np.float32))
    return float(loss.detach()), {key: float(value) for key, value in dict(metrics or {}).items()}, weights


def backward_data(data: Sequence[Datum], weights: Sequence[np.ndarray]) -> list[Datum]:
    return [Datum(model_input=datum.model_input,
                  loss_fn_inputs={"target_tokens": datum.loss_fn_inputs["target_tokens"],
                                  "weights": TensorData.from_numpy(weight)})
            for datum, weight in zip(data, weights)]
