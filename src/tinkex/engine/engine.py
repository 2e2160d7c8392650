"""The Engine: base models, their adapters, and the Tinker calls on them.

The server calls it from one worker thread. Every method either does what it says or raises
EngineError for input the caller can fix; the batch methods (forward_backward, sample) put an
EngineError in the slot of each bad job and still run the others.

Sampling comes two ways: `sample(jobs)` runs a set of requests to completion, and the continuous
interface (`submit_samples`, `step_samples`) keeps one running decode batch per base model that new
requests join between steps, so a server can interleave decoding with training.

Adapters beyond `max_resident_adapters` are parked, least recently used first (residency.py), and
come back on their next use.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import builtin, checkpoint, lora, models, residency, sampler, training, util
from .api import (
    BUILTIN_MODEL,
    AdamHyper,
    EngineError,
    ForwardBackwardJob,
    ForwardBackwardResult,
    LoraSpec,
    Ready,
    SampleJob,
    SampleResult,
)
from .optim import AdapterOptimizer
from .served import ServedModels

MAX_RANK = 1024


@dataclass
class Adapter:
    id: str
    base: models.BaseModel
    spec: LoraSpec
    scale: float
    trainable: bool  # False: loaded for sampling only
    paths: list[str]  # the modules it adapts, in model order
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A, B), as attached; {} while parked
    optimizer: AdapterOptimizer | None  # None while parked, and for sampling-only adapters
    parked: residency.Parked | None = None


class Engine(ServedModels):
    def __init__(self, base_models: Sequence[str] = (BUILTIN_MODEL,), *, device: str | None = None,
                 hf_home: Path | None = None, max_resident_adapters: int | None = None,
                 spill_dir: Path | None = None, sampler_backend: str = "torch",
                 vllm_engine_args: Mapping[str, object] | None = None):
        """`base_models`: the names served -- BUILTIN_MODEL, a model in the local Hugging Face
        cache, or a local directory. Only their configs are read here; weights load on first use.

        `max_resident_adapters` (None: no limit) bounds the adapters kept in the fast memory; the
        least recently used others are parked in `spill_dir` (a directory this engine owns and
        empties), or as CPU tensors without one.

        `sampler_backend="vllm"` samples from the base models and sampler checkpoints with vLLM on a
        GPU (vllm_sampler.py; `vllm_engine_args` go to its EngineArgs); "torch" is the built-in sampler."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":
            util.keep_freed_memory()
        self.cache_dir = builtin.hub_cache_dir(hf_home)
        self._bases = {name: models.BaseModel(name, models.resolve(name, self.cache_dir), self.device)
                       for name in dict.fromkeys(base_models)}
        self._adapters: dict[str, Adapter] = {}
        self._resident = residency.LRU(max_resident_adapters)
        self._spill_dir = Path(spill_dir) if spill_dir is not None else None
        if self._spill_dir is not None:  # left by an earlier process: nothing in it can be claimed
            shutil.rmtree(self._spill_dir, ignore_errors=True)
        self._decoding: dict[str, sampler.DecodeBatch] = {}  # base model -> its running sample requests
        self._cancelled: list[tuple[SampleJob, EngineError]] = []  # requests whose adapter was removed
        self._counters = {"forward_backward_batches": 0, "multi_adapter_batches": 0, "parks": 0, "unparks": 0}
        self._vllm = None  # the vLLM sampler backend, when chosen
        if sampler_backend == "vllm":
            from .vllm_sampler import VllmSampler

            self._vllm = VllmSampler(self._base, vllm_engine_args)
        elif sampler_backend != "torch":
            raise EngineError(f"unknown sampler backend {sampler_backend!r} (torch or vllm)")

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

    def adapter_ids(self) -> list[str]:
        return list(self._adapters)

    def remove_adapter(self, adapter_id: str) -> None:
        """Free an adapter; sample requests still decoding from it fail (step_samples reports them)."""
        adapter = self._adapter(adapter_id)
        for batch in self._decoding.values():
            for prepared in batch.cancel(adapter_id):
                self._cancelled.append((prepared.job, EngineError(
                    f"adapter {adapter_id!r} was removed while this request was sampling from it")))
        if adapter.parked is not None:
            residency.discard(adapter.parked)
        else:
            lora.detach(adapter_id, adapter.base.modules)
            if adapter.optimizer is not None:
                adapter.optimizer.zero_grad()
        self._resident.discard(adapter_id)
        del self._adapters[adapter_id]
        if self._vllm is not None:
            self._vllm.remove_adapter(adapter_id)

    def adapter_tensors(self, adapter_id: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The adapter's live LoRA tensors, {module path: (A [rank, in], B [out, rank])}, for
        inspection (their .grad holds the accumulated gradient). Not copies: do not resize them.
        (Parking replaces them: take them again after other adapters were used.)"""
        adapter = self._adapter(adapter_id)
        self._make_resident([adapter_id])
        return dict(adapter.weights)

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
        adapter = Adapter(adapter_id, base, spec, scale, trainable, list(weights), {}, None)
        self._install(adapter, weights)
        self._adapters[adapter_id] = adapter
        self._make_resident([adapter_id])
        return adapter

    def _install(self, adapter: Adapter, weights) -> None:
        """Put the adapter's tensors into its base model's LoRA modules (and give it an optimizer)."""
        device = adapter.base.device
        weights = {path: (a.to(device), b.to(device)) for path, (a, b) in weights.items()}
        params = lora.attach(adapter.id, weights, adapter.scale, adapter.base.modules, trainable=adapter.trainable)
        adapter.weights = dict(zip(weights, zip(params[0::2], params[1::2])))
        adapter.optimizer = AdapterOptimizer(params) if adapter.trainable else None

    # --- residency --------------------------------------------------------------------------

    def _make_resident(self, adapter_ids: Iterable[str]) -> None:
        """Unpark these adapters if needed and mark them used; then park the least recently used
        others beyond the budget (never one that running work needs)."""
        ids = [a for a in dict.fromkeys(adapter_ids) if a is not None]  # None: the bare base model
        for adapter_id in ids:
            adapter = self._adapters[adapter_id]
            if adapter.parked is not None:
                self._unpark(adapter)
            self._resident.touch(adapter_id)
        pinned = set(ids) | {job.owner for batch in self._decoding.values() for job in batch.jobs()}
        for adapter_id in self._resident.to_park(pinned):
            self._park(self._adapters[adapter_id])

    def _park(self, adapter: Adapter) -> None:
        moments, step = adapter.optimizer.state_tensors() if adapter.optimizer is not None else (None, 0)
        spill = self._spill_dir / f"{secrets.token_hex(16)}.safetensors" if self._spill_dir is not None else None
        adapter.parked = residency.park(adapter.weights, moments, step, spill)
        lora.detach(adapter.id, adapter.base.modules)
        adapter.weights, adapter.optimizer = {}, None
        self._resident.discard(adapter.id)
        self._counters["parks"] += 1

    def _unpark(self, adapter: Adapter) -> None:
        weights, grads, moments, step = residency.unpark(adapter.parked, adapter.paths, adapter.base.device)
        adapter.parked = None
        self._install(adapter, weights)
        for path, (a, b) in adapter.weights.items():
            a.grad, b.grad = grads.get(f"{path}.A"), grads.get(f"{path}.B")
        if adapter.optimizer is not None and moments is not None:
            adapter.optimizer.load_state_tensors(moments, step)
        self._counters["unparks"] += 1

    def stats(self) -> dict:
        """Counts for observability and tests: base models loaded (one copy each, however many
        adapters), adapters resident and parked, cross-tenant batches, running sample rows."""
        # Readable from another thread while the engine works: every collection is copied first
        # (list() of a dict is one step under the GIL), so nothing changes size under the loops.
        adapters, batches = list(self._adapters.values()), list(self._decoding.values())
        bases = {}
        for name, base in self._bases.items():
            loaded = base._model is not None
            params = list(base.model.parameters()) if loaded else []
            bases[name] = {"loaded": loaded, "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
                           "adapters": sum(1 for a in adapters if a.base is base)}
        parked = sum(1 for a in adapters if a.parked is not None)
        return {"base_models": bases,
                "adapters": {"total": len(adapters), "resident": len(adapters) - parked, "parked": parked,
                             "budget": self._resident.budget},
                "sampling": {"rows": sum(len(b.rows) for b in batches), "waiting": sum(len(b.pending) for b in batches)},
                **self._counters}

    # --- training ---------------------------------------------------------------------------

    def forward_backward(self, jobs: list[ForwardBackwardJob]) -> list[ForwardBackwardResult | EngineError]:
        """Run all jobs of one base model as one batch; gradients accumulate until optim_step."""
        results: list[ForwardBackwardResult | EngineError | None] = [None] * len(jobs)
        by_base: dict[str, list[training.PreparedJob]] = {}
        for i, job in enumerate(jobs):
            try:
                adapter = self._adapter(job.adapter_id)
                prepared = training.prepare(i, job, adapter.base, trainable=adapter.trainable)
            except EngineError as exc:
                results[i] = exc
                continue
            by_base.setdefault(adapter.base.name, []).append(prepared)
        self._make_resident(p.job.adapter_id for prepared in by_base.values() for p in prepared)
        for name, prepared_jobs in by_base.items():
            self._counters["forward_backward_batches"] += 1
            if len({p.job.adapter_id for p in prepared_jobs}) > 1:
                self._counters["multi_adapter_batches"] += 1
            for i, result in training.run(self._bases[name], prepared_jobs).items():
                results[i] = result
        return results

    def optim_step(self, adapter_id: str, hyper: AdamHyper) -> dict[str, float]:
        adapter = self._adapter(adapter_id)
        if not adapter.trainable:
            raise EngineError(f"adapter {adapter_id!r} was loaded for sampling only and cannot be trained")
        self._make_resident([adapter_id])
        return adapter.optimizer.step(hyper)

    def run_training(self, jobs: list[ForwardBackwardJob], steps: list[tuple[str, AdamHyper]]
                     ) -> tuple[list[ForwardBackwardResult | EngineError], list[dict[str, float] | EngineError]]:
        """forward_backward(jobs), then optim_steps(steps): a scheduler turn's training work, one call
        (one round trip to an engine worker). The scheduler never puts an adapter in both: its step
        waits for the next turn."""
        return (self.forward_backward(jobs) if jobs else []), self.optim_steps(steps)

    def submit_training(self, jobs: list[ForwardBackwardJob], steps: list[tuple[str, AdamHyper]]) -> Ready:
        """run_training, done at once (a worker pool's returns while its workers run it)."""
        return Ready(self.run_training(jobs, steps))

    def optim_steps(self, steps: list[tuple[str, AdamHyper]]) -> list[dict[str, float] | EngineError]:
        """optim_step for each (adapter id, hyperparameters), in order: the steps of many tenants in
        one call (one round trip to an engine worker); a bad step gets its EngineError, the others run."""
        results: list[dict[str, float] | EngineError] = []
        for adapter_id, hyper in steps:
            try:
                results.append(self.optim_step(adapter_id, hyper))
            except EngineError as exc:
                results.append(exc)
        return results

    # --- checkpoints ------------------------------------------------------------------------

    def save_state(self, adapter_id: str, directory: Path, *, optimizer: bool) -> int:
        adapter = self._adapter(adapter_id)
        self._make_resident([adapter_id])
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
        self._make_resident([adapter_id])
        ckpt = checkpoint.Checkpoint(adapter.base.name, adapter.spec, adapter.scale, adapter.weights)
        return checkpoint.save(Path(directory), ckpt, kind="sampler", with_optimizer=False)

    def load_sampler_weights(self, adapter_id: str, directory: Path) -> str:
        """An inference-only adapter from a save_sampler_weights or save_state directory (or any
        peft LoRA directory made on a served base model)."""
        self._check_new_id(adapter_id)
        ckpt = self._read_checkpoint(Path(directory), kind=None, with_optimizer=False)
        self._attach(adapter_id, self._bases[ckpt.base_model], ckpt.spec, ckpt.scale, ckpt.weights, trainable=False)
        if self._vllm is not None:  # vLLM samples from it; the torch copy serves the checks and Engine.sample
            try:
                self._vllm.add_adapter(adapter_id, Path(directory), ckpt.base_model, ckpt.spec.rank)
            except EngineError:
                self.remove_adapter(adapter_id)
                raise
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
        """Run these requests to completion, batched together (apart from any continuous batch)."""
        results: list[SampleResult | EngineError | None] = [None] * len(jobs)
        batches: dict[str, sampler.DecodeBatch] = {}
        for i, job in enumerate(jobs):
            try:
                base, prepared = self._prepare_sample(i, job)
            except EngineError as exc:
                results[i] = exc
                continue
            batches.setdefault(base.name, sampler.DecodeBatch(base)).submit([prepared])
        self._make_resident(job.owner for batch in batches.values() for job in batch.jobs())
        for batch in batches.values():
            while not batch.idle:
                for prepared in batch.step():
                    results[prepared.index] = prepared.result
        return results

    def submit_samples(self, jobs: list[SampleJob]) -> list[tuple[SampleJob, EngineError]]:
        """Queue requests for the running decode batch of their base model; they join it at the next
        step_samples(). Returns the requests refused at once, with the reason."""
        refused = []
        if self._vllm is not None:  # vLLM takes what it serves; requests on live training adapters stay here
            served = [self._vllm.serves(job) for job in jobs]
            refused = self._vllm.submit_samples([job for job, vllm in zip(jobs, served) if vllm])
            jobs = [job for job, vllm in zip(jobs, served) if not vllm]
        for job in jobs:
            try:
                base, prepared = self._prepare_sample(0, job)
            except EngineError as exc:
                refused.append((job, exc))
                continue
            batch = self._decoding.get(base.name)
            if batch is None:
                batch = self._decoding[base.name] = sampler.DecodeBatch(base)
            batch.submit([prepared])
            self._make_resident([job.adapter_id])
        return refused

    def step_samples(self) -> list[tuple[SampleJob, SampleResult | Exception]]:
        """One step of every running decode batch: queued requests join, every row gets one more
        token. Returns the requests that finished (or failed) since the last call."""
        done: list[tuple[SampleJob, SampleResult | Exception]] = list(self._cancelled)
        self._cancelled.clear()
        if self._vllm is not None:
            done += self._vllm.step_samples()
        for name, batch in list(self._decoding.items()):
            if batch.idle:
                continue
            try:
                done += [(prepared.job, prepared.result) for prepared in batch.step()]
            except Exception as exc:  # a fault (not bad input): fail this batch's requests, keep serving
                done += [(prepared.job, exc) for prepared in batch.jobs()]
                self._decoding[name] = sampler.DecodeBatch(batch.base)
        return done

    @property
    def sampling(self) -> bool:
        """Whether sample requests are queued or decoding (step_samples has work)."""
        return (bool(self._cancelled) or any(not batch.idle for batch in self._decoding.values())
                or (self._vllm is not None and self._vllm.sampling))

    def _prepare_sample(self, index: int, job: SampleJob) -> tuple[models.BaseModel, sampler.PreparedSample]:
        base = self._base(job.base_model)
        if job.adapter_id is not None and self._adapter(job.adapter_id).base is not base:
            raise EngineError(f"adapter {job.adapter_id!r} belongs to base model "
                              f"{self._adapters[job.adapter_id].base.name!r}, not {job.base_model!r}")
        _loaded(base)
        return base, sampler.prepare(index, job, base)


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
