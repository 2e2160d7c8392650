"""Fixtures for the engine tests: one Engine on the built-in model with a private HF cache, and
independent reference computations (a plain transformers model with LoRA merged into its weights)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tinkex.engine import BUILTIN_MODEL, DatumArrays, Engine, ForwardBackwardJob

os.environ["HF_HUB_OFFLINE"] = "1"

M = BUILTIN_MODEL
V = 2048  # the built-in vocabulary


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """The engine tests run torch on one thread, restored afterwards. On a small shared machine the
    OpenMP workers of two busy processes spin against each other and make the tiny model's ops up
    to 100x slower; one thread is as fast as two on an idle 2-core machine and immune to that.
    (The engine itself only drops to one thread, and back, around decode steps too small to share.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def engine_hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine-hf-home")


@pytest.fixture(scope="session")
def engine(engine_hf_home: Path) -> Engine:
    return Engine(hf_home=engine_hf_home)


@pytest.fixture(scope="session")
def ref_model(engine: Engine):
    """The same base weights loaded by plain transformers, untouched by the engine, in float64 so
    that its own rounding does not blur the comparison with the engine's float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine._bases[M].directory)
    return model.double().eval().requires_grad_(False)


_ids = iter(range(10**9))


@pytest.fixture
def new_id(request) -> callable:
    """Unique adapter ids, so tests can share the session engine."""
    return lambda: f"{request.node.name}-{next(_ids)}"


def datum(tokens, targets=None, **inputs) -> DatumArrays:
    tokens = np.asarray(tokens, np.int64)
    if targets is None:
        targets = np.roll(tokens, -1)
    return DatumArrays(tokens=tokens, inputs={"target_tokens": np.asarray(targets, np.int64),
                                               **{k: np.asarray(v, np.float32) for k, v in inputs.items()}})


def random_datum(rng: np.random.Generator, length: int, **inputs) -> DatumArrays:
    ids = rng.integers(0, V, length + 1)
    return datum(ids[:-1], ids[1:], **inputs)


def randomize_b(engine: Engine, adapter_id: str, seed: int, std: float = 0.05) -> None:
    """B starts at zero (the adapter is the identity); give it values so the adapter matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b in engine.adapter_tensors(adapter_id).values():
            b.copy_(torch.randn(b.shape, generator=generator) * std)


def grads(engine: Engine, adapter_id: str) -> dict[str, torch.Tensor]:
    out = {}
    for path, (a, b) in engine.adapter_tensors(adapter_id).items():
        out[path + ".A"] = a.grad.clone() if a.grad is not None else torch.zeros_like(a)
        out[path + ".B"] = b.grad.clone() if b.grad is not None else torch.zeros_like(b)
    return out


def clear_grads(engine: Engine, adapter_id: str) -> None:
    for a, b in engine.adapter_tensors(adapter_id).values():
        a.grad = b.grad = None


def full_logprobs(engine: Engine, adapter_id: str, tokens) -> np.ndarray:
    """log_softmax over the whole vocabulary at every position, through the engine: 2-D soft
    targets listing every token id, weight 0, forward only."""
    t = len(tokens)
    job = ForwardBackwardJob(adapter_id, [datum(tokens, np.tile(np.arange(V), (t, 1)), weights=np.zeros((t, V)))],
                             "cross_entropy", forward_only=True)
    return engine.forward_backward([job])[0].outputs[0]["logprobs"]


def reference_logprobs(ref_model, lora_weights: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
                       tokens, targets) -> torch.Tensor:
    """Target logprobs from the plain model with W + scale * B @ A swapped in for each adapted
    weight (merged, not the engine's per-row delta path). Differentiable in the A/B given."""
    from torch.func import functional_call

    params = {f"{path}.weight": ref_model.get_submodule(path).weight + scale * (b @ a)
              for path, (a, b) in lora_weights.items()}
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)[None]
    # tie_weights=False: replacing lm_head.weight must not replace the tied input embedding too.
    logits = functional_call(ref_model, params, (tokens,), {"use_cache": False}, tie_weights=False).logits[0]
    logprobs = logits.log_softmax(-1)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    return logprobs.gather(1, targets.view(len(targets), -1)).view(targets.shape)


def leaf_copies(engine: Engine, adapter_id: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """float64 copies of the adapter's tensors, as leaves for the reference's own gradient."""
    return {path: (a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True))
            for path, (a, b) in engine.adapter_tensors(adapter_id).items()}


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """|got - want| <= tol * max(1, max|want|) everywhere: float32 sums of many terms are exact to
    about 1e-6 of the tensor's scale, not of each (possibly tiny, cancelled) element."""
    want = want.double()
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} * {scale:.3g}"
