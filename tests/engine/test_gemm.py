"""The oneDNN projection: same values and gradients as F.linear, used only where it pays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinkex.engine import gemm

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch build has no oneDNN")


@pytest.fixture
def backend(monkeypatch):
    """Set TINKEX_CPU_GEMM for one test; the choice is measured or read once per process, so reset it."""
    def choose(value: str) -> None:
        monkeypatch.setenv("TINKEX_CPU_GEMM", value)
        gemm.onednn_is_faster.cache_clear()

    yield choose
    gemm.onednn_is_faster.cache_clear()


def _pair(rows: int, inputs: int, outputs: int, *, bias: bool, weight_grad: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inputs, generator=generator, requires_grad=True)
    weight = torch.randn(outputs, inputs, generator=generator, requires_grad=weight_grad)
    b = torch.randn(outputs, generator=generator, requires_grad=True) if bias else None
    return x, weight, b


@pytest.mark.parametrize("rows,inputs,outputs", [(300, 64, 2048), (300, 2048, 64), (40, 512, 512)])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_matches_f_linear_values_and_gradients(rows, inputs, outputs, bias):
    # Wide and narrow outputs take the two ways of forming the weight's gradient (see backward).
    x, weight, b = _pair(rows, inputs, outputs, bias=bias, weight_grad=True)
    grad = torch.randn(rows, outputs, generator=torch.Generator().manual_seed(1))

    ours = gemm._OneDnnLinear.apply(x, weight, b)
    ours_grads = torch.autograd.grad(ours, [x, weight] + ([b] if bias else []), grad)
    reference = F.linear(x, weight, b)
    reference_grads = torch.autograd.grad(reference, [x, weight] + ([b] if bias else []), grad)

    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)
    for mine, theirs in zip(ours_grads, reference_grads, strict=True):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-3)


def test_frozen_weight_keeps_no_input_for_the_backward():
    # A frozen base projection (every LoRA model's) needs only the weight to pass the gradient on.
    x, weight, _ = _pair(300, 64, 2048, bias=False, weight_grad=False)
    out = gemm._OneDnnLinear.apply(x, weight, None)
    saved_x, saved_weight = out.grad_fn.saved_tensors
    assert saved_x is None and saved_weight is weight
    (grad_x,) = torch.autograd.grad(out.sum(), [x])
    torch.testing.assert_close(grad_x, weight.sum(0).expand(300, -1), rtol=1e-5, atol=1e-4)


def test_linear_routes_by_setting_and_size(backend):
    big, small = _pair(300, 64, 2048, bias=False, weight_grad=False), _pair(4, 8, 8, bias=False, weight_grad=False)

    backend("onednn")
    assert gemm.onednn_is_faster()
    assert type(gemm.linear(*big[:2]).grad_fn).__name__ == "_OneDnnLinearBackward"
    # below MIN_ONEDNN_MACS oneDNN's fixed cost per call outweighs its kernel
    assert type(gemm.linear(*small[:2]).grad_fn).__name__ != "_OneDnnLinearBackward"
    with torch.inference_mode():  # the sampler's decode runs here
        torch.testing.assert_close(gemm.linear(*big[:2]), F.linear(*big[:2]), rtol=1e-5, atol=1e-4)

    backend("torch")
    assert not gemm.onednn_is_faster()
    out = gemm.linear(*big[:2])
    assert type(out.grad_fn).__name__ != "_OneDnnLinearBackward"
    assert torch.equal(out, F.linear(*big[:2]))


@pytest.mark.parametrize("in_place", [False, True])
def test_add_linear_is_out_plus_scaled_product(backend, in_place):
    backend("onednn")
    generator = torch.Generator().manual_seed(2)
    for rows, inputs, outputs in [(300, 32, 2048), (3, 4, 5)]:  # through oneDNN, and a fused addmm
        out, x = torch.randn(rows, outputs, generator=generator), torch.randn(rows, inputs, generator=generator)
        weight = torch.randn(outputs, inputs, generator=generator)
        expected = out + 0.5 * x @ weight.t()
        result = gemm.add_linear(out, x, weight, 0.5, in_place=in_place)
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-4)
        assert (result.data_ptr() == out.data_ptr()) == in_place


def test_measured_choice_is_made_once(backend):
    backend("")  # no override: measure
    first = gemm.onednn_is_faster()
    assert isinstance(first, bool)
    assert gemm.onednn_is_faster.cache_info().misses == 1
    assert gemm.onednn_is_faster() is first and gemm.onednn_is_faster.cache_info().hits >= 1


def test_packed_weight_gives_the_same_projection(backend):
    backend("onednn")
    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(1536, 512, generator=generator), torch.randn(1536, generator=generator)
    packed = gemm.pack(weight)
    assert packed is not None
    for rows in (1, 32, 300):  # a decode step's rows, and a prefill's
        x = torch.randn(rows, 512, generator=generator)
        with torch.inference_mode():
            torch.testing.assert_close(gemm.packed_linear(x, packed, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)

    backend("torch")  # where oneDNN is not the library used, nothing is packed
    assert gemm.pack(weight) is None


@pytest.mark.parametrize("budget", [gemm.MAX_PACKED_BYTES, 0])
def test_sampling_packs_the_weights_of_a_model_within_budget(backend, engine_hf_home, monkeypatch, budget):
    """Decoding keeps packed copies of the built-in model's big projections (its head) -- unless
    the model's weights exceed the budget for having them twice -- and samples the same tokens."""
    from tinkex.engine import Engine, SampleJob

    backend("onednn")
    monkeypatch.setattr(gemm, "MAX_PACKED_BYTES", budget)
    engine = Engine(hf_home=engine_hf_home)
    job = SampleJob("tinkex/tiny-qwen3", None, list(range(3, 35)), max_tokens=6, seed=4, stop_token_ids=[],
                    num_samples=32)  # 32 rows: the head's product is over oneDNN's threshold
    (result,) = engine.sample([job])
    head = engine._bases["tinkex/tiny-qwen3"].modules["lm_head"]
    assert (head._packed is not None) == (budget > 0)

    backend("torch")  # a fresh engine with torch's own matmuls draws the same tokens from the same seed
    (reference,) = Engine(hf_home=engine_hf_home).sample([job])
    assert [list(s.tokens) for s in result.sequences] == [list(s.tokens) for s in reference.sequences]
