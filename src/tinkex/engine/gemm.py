"""Dense projections on CPU through oneDNN where it is the faster matmul library.

PyTorch's x86 wheels do float32 matmuls with MKL, and MKL's sgemm takes a generic code path on
processors that are not Intel's: on the AMD Zen 4 cores this project is benchmarked on it reaches
~110 GFLOP/s per core where oneDNN -- which every such build also carries, and uses for bf16 --
reaches ~250 on the same shapes. `linear` sends a projection through oneDNN when a short
measurement at first use found it faster on this machine and the product is big enough for
oneDNN's higher fixed cost per call (~10 us, so tiny products stay with F.linear); its backward
does the same for the input's and the weight's gradients. Same float32 arithmetic in another
summation order: results agree with F.linear to float rounding.

Where nothing trains -- decoding and prefill -- a projection can also use a copy of its weight
that oneDNN has reordered once into its own blocked layout (`pack`): ~1.3-1.7x faster again on the
few-row products of a decode step, whose weights stream from memory each step. The copy doubles
the memory of the weights it is made for, so the engine makes it only for models whose projection
weights fit in MAX_PACKED_BYTES (models.BaseModel).

`TINKEX_CPU_GEMM=onednn` or `=torch` skips the measurement and decides.
"""

from __future__ import annotations

import functools
import os
import time

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Below this many multiply-adds (rows x in x out) oneDNN's fixed cost outweighs its faster kernel.
MIN_ONEDNN_MACS = 1 << 20
# Packed copies are made for a base model whose projection weights take at most this many bytes.
MAX_PACKED_BYTES = 2 << 30


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for 2-D x, through oneDNN where that is faster (see the module doc)."""
    if worth_onednn(x, weight):
        return _OneDnnLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def add_linear(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, alpha: float, *,
               in_place: bool = False) -> torch.Tensor:
    """out + alpha * x @ weight.T for 2-D out and x (in place into `out` if asked): one fused addmm
    where oneDNN is not used."""
    if worth_onednn(x, weight):
        product = _OneDnnLinear.apply(x, weight, None)
        return out.add_(product, alpha=alpha) if in_place else torch.add(out, product, alpha=alpha)
    if in_place:
        return out.addmm_(x, weight.t(), alpha=alpha)
    return torch.addmm(out, x, weight.t(), alpha=alpha)


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a float32 CPU weight [out, in] for `packed_linear`; None where oneDNN
    is not the library used here."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not onednn_is_faster():
        return None
    try:  # the layout is chosen for a batch of 32 rows; measured as good for 1 to 1,024 rows
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)
    except (AttributeError, RuntimeError):  # a private op: absent or changed in this PyTorch build
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for 2-D x with the weight `pack` made; no gradient flows."""
    return _onednn(x, packed, bias)


def worth_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight.T (2-D x) goes through oneDNN here: float32 on CPU, big enough, and oneDNN
    the faster library on this machine."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and x.shape[0] * weight.shape[0] * weight.shape[1] >= MIN_ONEDNN_MACS and onednn_is_faster())


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) by oneDNN; weight may be a transposed view (oneDNN reads strides)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # The input is kept only when the weight trains: a frozen projection's backward needs the weight alone.
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x = _onednn(grad, weight.t()) if need_x else None  # grad @ weight
        grad_weight = None
        if need_weight:  # grad.T @ x; oneDNN wants a contiguous input, so transpose the smaller operand
            if grad.shape[1] > x.shape[1]:
                grad_weight = _onednn(x.t().contiguous(), grad.t()).t()  # (x.T @ grad).T
            else:
                grad_weight = _onednn(grad.t().contiguous(), x.t())
        grad_bias = grad.sum(0) if need_bias and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


@functools.cache  # once per process
def onednn_is_faster() -> bool:
    """Whether oneDNN multiplies a mid-sized float32 product clearly faster than F.linear here."""
    choice = os.environ.get("TINKEX_CPU_GEMM", "").lower()
    if choice in ("onednn", "torch"):
        return choice == "onednn" and _onednn_available()
    if not _onednn_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(128, 512, generator=generator), torch.randn(512, 512, generator=generator)
    torch_s, onednn_s = [], []
    # Interleaved, best of fifteen: on a busy machine some run of each still gets a core to itself.
    # (Best of five chose MKL about once in a hundred busy starts, and a process keeps its choice.)
    for _ in range(15):
        for run, times in ((lambda: F.linear(x, weight), torch_s), (lambda: _onednn(x, weight), onednn_s)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return min(onednn_s) * 1.25 < min(torch_s)


def _onednn_available() -> bool:
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:  # a private op of PyTorch's oneDNN integration: check it still answers as expected
        x, weight = torch.ones(2, 3), torch.ones(4, 3)
        return torch.equal(_onednn(x, weight), F.linear(x, weight))
    except (RuntimeError, TypeError):
        return False
