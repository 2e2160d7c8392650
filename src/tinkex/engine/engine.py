"""The Engine: base models, their adapters, and the Tinker calls on them.

The server calls it from one worker thread. Every method either does what it says or raises
EngineError for input the caller can fix; the batch methods (forward_backward, sample) put an
EngineError in the slot of each bad job and still run the others.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import builtin, checkpoint, lora, models, sampler, training
from .api import (
    BUILTIN_MODEL,
    AdamHyper,
    BaseModelInfo,
    EngineError,
    ForwardBackwardJob,
    ForwardBackwardResult,
    LoraSpec,
    SampleJob,
    SampleResult,
)
from .optim import AdapterOptimizer

MAX_RANK = 1024


@dataclass
class Adapter:
    id: str
    base: models.BaseModel
    spec: LoraSpec
    scale: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A, B), as attached
    optimizer: AdapterOptimizer | None  # None: loaded for sampling only


class Engine:
    def __init__(self, base_models: Sequence[str] = (BUILTIN_MODEL,), *, device: str | None = None,
                 hf_home: Path | None = None):
        """`base_models`: the names served -- BUILTIN_MODEL, a model in the local Hugging Face
        cache, or a local directory. Only their configs are read here; weights load on first use."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cache_dir = builtin.hub_cache_dir(hf_home)
        self._bases = {name: models.BaseModel(name, models.resolve(name, self.cache_dir), self.device)
                       for name in dict.fromkeys(base_models)}
        self._adapters: dict[str, Adapter] = {}

    # --- base models ------------------------------------------------------------------------

    def model_infos(self) -> list[BaseModelInfo]:
        return [base.info for base in self._bases.values()]

    def model_info(self, base_model: str) -> BaseModelInfo:
        return self._base(base_model).info

    def tokenizer(self, base_model: str):
        return self._base(base_model).tokenizer

    def _base(self, name: str) -> models.BaseModel:
        try:
            return self._bases[name]
        except KeyError:
            raise EngineError(f"base model {name!r} is not served here (served: {', '.join(self._bases)})") from None

    # --- adapters ---------------------------------------------------------------------------

    def create_adapter(self, adapter_id: str, base_model: str, spec: LoraSpec) -> None:
        _check_spec(spec)
        base = self._base(base_model)
        self._check_new_id(adapter_id)
        seed = spec.seed if spec.seed is not None else secrets.randbits(63)
        weights = lora.init_weights(spec, _loaded(base), base.device, seed)
        self._attach(adapter_id, base, spec, lora.default_scale(spec.rank), weights, trainable=True)

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self._adapters

    def remove_adapter(self, adapter_id: str) -> None:
        adapter = self._adapter(adapter_id)
        lora.detach(adapter_id, adapter.base.modules)
        if adapter.optimizer is not None:
            adapter.optimizer.zero_grad()
        del self._adapters[adapter_id]

    def adapter_tensors(self, adapter_id: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The adapter's live LoRA tensors, {module path: (A [rank, in], B [out, rank])}, for
        inspection (their .grad holds the accumulated gradient). Not copies: do not resize them."""
        return dict(self._adapter(adapter_id).weights)

    def _adapter(self, adapter_id: str) -> Adapter:
        try:
            return self._adapters[adapter_id]
        except KeyError:
            raise EngineError(f"unknown adapter {adapter_id!r}") from None

    def _check_new_id(self, adapter_id: str) -> None:
        if not isinstance(adapter_id, str) or not adapter_id:
            raise EngineError("adapter id must be a non-empty string")
        if adapter_id in self._adapters:
            raise EngineError(f"adapter {adapter_id!r} already exists")

    def _attach(self, adapter_id, base, spec, scale, weights, *, trainable: bool) -> Adapter:
        weights = {path: (a.to(base.device), b.to(base.device)) for path, (a, b) in weights.items()}
        params = lora.attach(adapter_id, weights, scale, base.modules, trainable=trainable)
        attached = dict(zip(weights, zip(params[0::2], params[1::2])))
        adapter = Adapter(adapter_id, base, spec, scale, attached, AdapterOptimizer(params) if trainable else None)
        self._adapters[adapter_id] = adapter
        return adapter

    # --- training ---------------------------------------------------------------------------

    def forward_backward(self, jobs: list[ForwardBackwardJob]) -> list[ForwardBackwardResult | EngineError]:
        """Run all jobs of one base model as one batch; gradients accumulate until optim_step."""
        results: list[ForwardBackwardResult | EngineError | None] = [None] * len(jobs)
        by_base: dict[str, list[training.PreparedJob]] = {}
        for i, job in enumerate(jobs):
            try:
                adapter = self._adapter(job.adapter_id)
                prepared = training.prepare(i, job, adapter.base, trainable=adapter.optimizer is not None)
            except EngineError as exc:
                results[i] = exc
                continue
            by_base.setdefault(adapter.base.name, []).append(prepared)
        for name, prepared_jobs in by_base.items():
            for i, result in training.run(self._bases[name], prepared_jobs).items():
                results[i] = result
        return results

    def optim_step(self, adapter_id: str, hyper: AdamHyper) -> dict[str, float]:
        adapter = self._adapter(adapter_id)
        if adapter.optimizer is None:
            raise EngineError(f"adapter {adapter_id!r} was loaded for sampling only and cannot be trained")
        return adapter.optimizer.step(hyper)

    # --- checkpoints ------------------------------------------------------------------------

    def save_state(self, adapter_id: str, directory: Path, *, optimizer: bool) -> int:
        adapter = self._adapter(adapter_id)
        moments, step = adapter.optimizer.state_tensors() if adapter.optimizer else (None, 0)
        ckpt = checkpoint.Checkpoint(adapter.base.name, adapter.spec, adapter.scale, adapter.weights, moments, step)
        return checkpoint.save(Path(directory), ckpt, kind="state", with_optimizer=optimizer)

    def load_state(self, adapter_id: str, directory: Path, *, optimizer: bool) -> tuple[str, LoraSpec]:
        self._check_new_id(adapter_id)
        ckpt = self._read_checkpoint(Path(directory), kind="state", with_optimizer=optimizer)
        adapter = self._attach(adapter_id, self._bases[ckpt.base_model], ckpt.spec, ckpt.scale, ckpt.weights,
                               trainable=True)
        if optimizer and ckpt.moments is not None:
            adapter.optimizer.load_state_tensors(ckpt.moments, ckpt.step)
        return ckpt.base_model, ckpt.spec

    def save_sampler_weights(self, adapter_id: str, directory: Path) -> int:
        adapter = self._adapter(adapter_id)
        ckpt = checkpoint.Checkpoint(adapter.base.name, adapter.spec, adapter.scale, adapter.weights)
        return checkpoint.save(Path(directory), ckpt, kind="sampler", with_optimizer=False)

    def load_sampler_weights(self, adapter_id: str, directory: Path) -> str:
        """An inference-only adapter from a save_sampler_weights or save_state directory (or any
        peft LoRA directory made on a served base model)."""
        self._check_new_id(adapter_id)
        ckpt = self._read_checkpoint(Path(directory), kind=None, with_optimizer=False)
        self._attach(adapter_id, self._bases[ckpt.base_model], ckpt.spec, ckpt.scale, ckpt.weights, trainable=False)
        return ckpt.base_model

    def _read_checkpoint(self, directory: Path, *, kind: str | None, with_optimizer: bool) -> checkpoint.Checkpoint:
        base_name = checkpoint.base_model_of(directory)
        base = self._find_base(base_name)
        if base is None:
            raise EngineError(f"checkpoint {directory} was made on base model {base_name!r}, "
                              f"which is not served here (served: {', '.join(self._bases)})")
        ckpt = checkpoint.load(directory, base.module_shapes(), kind=kind, with_optimizer=with_optimizer)
        ckpt.base_model = base.name
        _check_spec(ckpt.spec)
        return ckpt

    def _find_base(self, name: str) -> models.BaseModel | None:
        """A served base model by name, or by its directory (peft records the path it was given)."""
        if name in self._bases:
            return self._bases[name]
        try:
            path = Path(name).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        return next((b for b in self._bases.values() if b.directory.resolve() == path), None)

    # --- sampling ---------------------------------------------------------------------------

    def sample(self, jobs: list[SampleJob]) -> list[SampleResult | EngineError]:
        results: list[SampleResult | EngineError | None] = [None] * len(jobs)
        by_base: dict[str, list[sampler.PreparedSample]] = {}
        for i, job in enumerate(jobs):
            try:
                base = self._base(job.base_model)
                if job.adapter_id is not None and self._adapter(job.adapter_id).base is not base:
                    raise EngineError(f"adapter {job.adapter_id!r} belongs to base model "
                                      f"{self._adapters[job.adapter_id].base.name!r}, not {job.base_model!r}")
                prepared = sampler.prepare(i, job, base)
            except EngineError as exc:
                results[i] = exc
                continue
            by_base.setdefault(base.name, []).append(prepared)
        for name, prepared_jobs in by_base.items():
            for i, result in sampler.run(self._bases[name], prepared_jobs).items():
                results[i] = result
        return results


def _loaded(base: models.BaseModel) -> dict[str, lora.LoraLinear]:
    base.model  # noqa: B018 -- loads the weights and wraps the linears
    return base.modules


def _check_spec(spec: LoraSpec) -> None:
    if not isinstance(spec.rank, int) or not 1 <= spec.rank <= MAX_RANK:
        raise EngineError(f"LoRA rank must be an integer between 1 and {MAX_RANK}, got {spec.rank!r}")
    if not (spec.train_attn or spec.train_mlp or spec.train_unembed):
        raise EngineError("LoRA config trains nothing: set at least one of train_attn, train_mlp, train_unembed")
    if spec.seed is not None and not isinstance(spec.seed, int):
        raise EngineError(f"LoRA seed must be an integer, got {spec.seed!r}")
