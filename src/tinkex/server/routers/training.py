"""Training: create models, forward/backward, optimizer steps, saving and loading weights.

The per-step routes (forward_backward, forward, optim_step) are coroutines: they only check the
input against the in-memory run table, write one request row and queue the work, so running them on
the event loop saves each step two thread-pool hops. Routes that read files or list rows stay plain
functions (FastAPI runs those in its thread pool)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import zstandard
from fastapi import APIRouter, HTTPException, Request
from pydantic import ValidationError

from tinkex.engine.api import AdamHyper, ForwardBackwardJob, LoraSpec
from tinkex.types import (
    CreateModelRequest,
    CreateModelResponse,
    ForwardBackwardInput,
    ForwardBackwardRequest,
    ForwardRequest,
    GetInfoRequest,
    GetInfoResponse,
    LoadWeightsRequest,
    LoadWeightsResponse,
    ModelData,
    OptimStepRequest,
    OptimStepResponse,
    ProtoDecodeError,
    SaveWeightsForSamplerRequest,
    SaveWeightsForSamplerResponse,
    SaveWeightsRequest,
    SaveWeightsResponse,
    UnloadModelRequest,
    UnloadModelResponse,
    UntypedAPIFuture,
    decode_forward_backward_request,
    tinker_path,
)

from .. import convert
from ..deps import RuntimeDep, TenantDep
from ..routing import LeanRoute
from ..futures import Outcome
from ..runtime import Runtime, bad_request, not_found
from ..scheduler import SeqIdError, Work
from ..store import CheckpointRow, SamplingSessionRow, TrainingRunRow, utcnow

router = APIRouter(prefix="/api/v1", route_class=LeanRoute)  # the per-step routes: see routing.py
MAX_RANK = 256


def enqueue(runtime: Runtime, tenant: str, model_id: str, seq_id: int | None, request_type: str,
            build: Callable[[], Work | Callable[[], Outcome]], *, bounded: bool = True) -> UntypedAPIFuture:
    """Dedupe by (model_id, seq_id), build the work (which checks the input), and queue it in order.

    When the scheduler is full (and `bounded`) this raises QueueFull, a 429, before the future is
    recorded or the seq_id used, so the client's resubmission of the same seq_id is accepted later."""
    if seq_id is not None and runtime.owns_model(model_id, tenant) and \
            (existing := runtime.scheduler.existing(model_id, seq_id)) is not None:
        return UntypedAPIFuture(request_id=existing, model_id=model_id)
    try:
        built = build()
    except HTTPException:
        # The client moves on to seq_id + 1 after a rejected request, so the queue must too.
        if seq_id is not None and runtime.scheduler.has_model(model_id):
            runtime.scheduler.skip(model_id, seq_id)
        raise
    if seq_id is None:
        seq_id = runtime.scheduler.next_seq(model_id)
    with runtime.scheduler.room(model_id, seq_id) if bounded else nullcontext():
        future = runtime.futures.create(tenant, request_type, model_id, seq_id)
        work = built if isinstance(built, Work) else Work(future=future, run=built)
        work.future = future
        try:
            runtime.scheduler.submit(model_id, seq_id, work)
        except SeqIdError as exc:
            runtime.futures.resolve(future, Outcome(error=str(exc), category="user"))
            raise bad_request(str(exc)) from None
    runtime.touch_run(model_id)
    return UntypedAPIFuture(request_id=future.request_id, model_id=model_id)


async def stored(runtime: Runtime, future: UntypedAPIFuture) -> UntypedAPIFuture:
    """The answer of a coroutine route, once its request's row is committed (see futures.py)."""
    await runtime.futures.stored(future.request_id)
    return future


def _lora_spec(rank: int, seed: int | None, train_mlp: bool, train_attn: bool, train_unembed: bool) -> LoraSpec:
    if not 1 <= rank <= MAX_RANK:
        raise bad_request(f"LoRA rank must be between 1 and {MAX_RANK}, not {rank}")
    if seed is not None and not 0 <= seed < 2**63:
        raise bad_request("the LoRA seed must be between 0 and 2**63 - 1")
    if not (train_mlp or train_attn or train_unembed):
        raise bad_request("at least one of train_mlp, train_attn and train_unembed must be true")
    return LoraSpec(rank=rank, seed=seed, train_mlp=train_mlp, train_attn=train_attn, train_unembed=train_unembed)


@router.post("/create_model")
def create_model(body: CreateModelRequest, runtime: RuntimeDep, tenant: TenantDep) -> UntypedAPIFuture:
    model_id = f"{body.session_id}:train:{body.model_seq_id}"
    if runtime.owns_model(model_id, tenant) and (existing := runtime.scheduler.existing(model_id, 0)) is not None:
        return UntypedAPIFuture(request_id=existing, model_id=model_id)
    runtime.active_session(body.session_id, tenant)
    info = runtime.model_info(body.base_model)
    lora = body.lora_config
    spec = _lora_spec(lora.rank, lora.seed, lora.train_mlp, lora.train_attn, lora.train_unembed)
    if runtime.store.get(TrainingRunRow, model_id) is not None:
        raise bad_request(f"model {model_id!r} already exists")
    runtime.open_model(TrainingRunRow(
        id=model_id, tenant=tenant, session_id=body.session_id, base_model=info.name, lora_rank=spec.rank,
        seed=spec.seed, train_mlp=spec.train_mlp, train_attn=spec.train_attn, train_unembed=spec.train_unembed,
        user_metadata=body.user_metadata))

    def run() -> Outcome:
        runtime.engine.create_adapter(model_id, info.name, spec)
        return Outcome(result=CreateModelResponse(model_id=model_id))

    # Creation is admitted over the queue bound: each training client creates once, and the official SDK
    # retries a refused create only ~10 times (a busy queue would fail it) where it retries steps for minutes.
    return enqueue(runtime, tenant, model_id, 0, "CreateModel", lambda: run, bounded=False)


@router.post("/get_info")
def get_info(body: GetInfoRequest, runtime: RuntimeDep, tenant: TenantDep) -> GetInfoResponse:
    run = runtime.training_run(body.model_id, tenant)
    info = runtime.model_info(run.base_model)
    return GetInfoResponse(
        model_id=run.id, model_name=run.base_model, is_lora=True, lora_rank=run.lora_rank,
        optimizer_config={"type": "adamw"},
        model_data=ModelData(arch=info.arch, model_name=run.base_model, tokenizer_id=info.tokenizer_id),
    )


def _forward_backward(runtime: Runtime, tenant: str, model_id: str, seq_id: int, fb_input: ForwardBackwardInput,
                      forward_only: bool) -> UntypedAPIFuture:
    def build() -> Work:
        run = runtime.live_model(model_id, tenant)
        info = runtime.model_info(run.base_model)
        try:
            convert.check_loss(fb_input.loss_fn, fb_input.loss_fn_config)
            if not fb_input.data:
                raise convert.InputError("forward_backward needs at least one datum")
            data = [convert.datum_arrays(d, i, fb_input.loss_fn, info) for i, d in enumerate(fb_input.data)]
        except convert.InputError as exc:
            raise bad_request(str(exc)) from None
        job = ForwardBackwardJob(adapter_id=model_id, data=data, loss_fn=fb_input.loss_fn,
                                 loss_fn_config=dict(fb_input.loss_fn_config or {}), forward_only=forward_only)
        return Work(forward_backward=job,
                    finish=lambda result: Outcome(result=convert.forward_backward_output(result)))

    return enqueue(runtime, tenant, model_id, seq_id, "Forward" if forward_only else "ForwardBackward", build)


@router.post("/forward_backward")
async def forward_backward(request: Request, runtime: RuntimeDep, tenant: TenantDep) -> UntypedAPIFuture:
    body = await request.body()
    if "zstd" in request.headers.get("content-encoding", "").lower():
        try:
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=runtime.settings.max_body_bytes)
        except zstandard.ZstdError as exc:
            raise bad_request(f"the body is not valid zstd: {exc}") from None
    if "protobuf" in request.headers.get("content-type", ""):
        try:
            model_id, seq_id, fb_input, forward_only = decode_forward_backward_request(body)
        except (ProtoDecodeError, ValidationError, ValueError) as exc:
            raise bad_request(f"malformed forward_backward protobuf: {exc}") from None
    else:  # the JSON body of SDKs before 0.25
        try:
            parsed = ForwardBackwardRequest.model_validate_json(body)
        except ValidationError as exc:
            raise bad_request(f"malformed forward_backward body: {exc}") from None
        model_id, seq_id = parsed.model_id, parsed.seq_id
        fb_input, forward_only = parsed.forward_backward_input, parsed.forward_only
    return await stored(runtime, _forward_backward(runtime, tenant, model_id, seq_id, fb_input, forward_only))


@router.post("/forward")
async def forward(body: ForwardRequest, runtime: RuntimeDep, tenant: TenantDep) -> UntypedAPIFuture:
    return await stored(runtime, _forward_backward(runtime, tenant, body.model_id, body.seq_id, body.forward_input,
                                                   forward_only=True))


@router.post("/optim_step")
async def optim_step(body: OptimStepRequest, runtime: RuntimeDep, tenant: TenantDep) -> UntypedAPIFuture:
    params = body.adam_params
    hyper = AdamHyper(learning_rate=params.learning_rate, beta1=params.beta1, beta2=params.beta2, eps=params.eps,
                      weight_decay=params.weight_decay, grad_clip_norm=params.grad_clip_norm)

    def build() -> Work:
        runtime.live_model(body.model_id, tenant)
        if not (0 <= hyper.learning_rate <= 10 and 0 <= hyper.beta1 < 1 and 0 <= hyper.beta2 < 1
                and hyper.eps > 0 and hyper.weight_decay >= 0 and hyper.grad_clip_norm >= 0):
            raise bad_request("Adam parameters out of range: need 0 <= learning_rate <= 10, betas in [0, 1), "
                              "eps > 0, weight_decay >= 0, grad_clip_norm >= 0")
        return Work(optim_step=(body.model_id, hyper),
                    finish=lambda metrics: Outcome(result=OptimStepResponse(metrics=metrics)))

    return await stored(runtime, enqueue(runtime, tenant, body.model_id, body.seq_id, "OptimStep", build))


def _record_checkpoint(runtime: Runtime, tenant: str, run_id: str, kind: str, name: str, directory: Path,
                       size: int, ttl_seconds: int | None, user_metadata: dict | None) -> str:
    path = tinker_path(run_id, kind, name)  # type: ignore[arg-type]
    expires = utcnow() + timedelta(seconds=ttl_seconds) if ttl_seconds else None
    runtime.store.delete(CheckpointRow, path)  # an overwrite replaces the record too
    runtime.store.add(CheckpointRow(tinker_path=path, tenant=tenant, training_run_id=run_id, checkpoint_type=kind,
                                    name=name, directory=str(directory), size_bytes=size,
                                    user_metadata=user_metadata, expires_at=expires))
    return path


@router.post("/save_weights")
def save_weights(body: SaveWeightsRequest, runtime: RuntimeDep, tenant: TenantDep) -> UntypedAPIFuture:
    def build() -> Callable[[], Outcome]:
        runtime.live_model(body.model_id, tenant)
        name = runtime.checkpoint_name(body.path)
        path = tinker_path(body.model_id, "training", name)
        if not body.overwrite and runtime.store.get(CheckpointRow, path) is not None:
            raise bad_request(f"checkpoint {path} already exists; pass overwrite=True to replace it")
        directory = runtime.checkpoint_dir(tenant, body.model_id, "training", name)

        def run() -> Outcome:
            size = runtime.engine.save_state(body.model_id, directory, optimizer=True)
            _record_checkpoint(runtime, tenant, body.model_id, "training", name, directory, size,
                               body.ttl_seconds, body.user_metadata)
            return Outcome(result=SaveWeightsResponse(path=path))

        return run

    return enqueue(runtime, tenant, body.model_id, body.seq_id, "SaveWeights", build)


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(body: SaveWeightsForSamplerRequest, runtime: RuntimeDep,
                             tenant: TenantDep) -> UntypedAPIFuture:
    def build() -> Callable[[], Outcome]:
        run_row = runtime.live_model(body.model_id, tenant)
        if body.path is not None:
            name = runtime.checkpoint_name(body.path)
            directory = runtime.checkpoint_dir(tenant, body.model_id, "sampler", name)

            def run_named() -> Outcome:
                size = runtime.engine.save_sampler_weights(body.model_id, directory)
                path = _record_checkpoint(runtime, tenant, body.model_id, "sampler", name, directory, size,
                                          body.ttl_seconds, body.user_metadata)
                return Outcome(result=SaveWeightsForSamplerResponse(path=path))

            return run_named
        if body.sampling_session_seq_id is None:
            raise bad_request("save_weights_for_sampler needs a path (a name) or a sampling_session_seq_id")
        sampler_id = f"{run_row.session_id}:sample:{body.sampling_session_seq_id}"

        def run_unnamed() -> Outcome:
            # An unnamed save backs a new sampling session: a frozen snapshot, or the live adapter for "inflight".
            model_path = f"live:{body.model_id}"
            if body.kind != "inflight":
                directory = runtime.settings.data_dir / "snapshots" / uuid.uuid4().hex
                runtime.engine.save_sampler_weights(body.model_id, directory)
                model_path = f"snapshot:{directory}"
            runtime.store.add(SamplingSessionRow(id=sampler_id, tenant=tenant, session_id=run_row.session_id,
                                                 base_model=run_row.base_model, model_path=model_path))
            return Outcome(result=SaveWeightsForSamplerResponse(sampling_session_id=sampler_id))

        return run_unnamed

    return enqueue(runtime, tenant, body.model_id, body.seq_id, "SaveWeightsForSampler", build)


@router.post("/load_weights")
def load_weights(body: LoadWeightsRequest, runtime: RuntimeDep, tenant: TenantDep) -> UntypedAPIFuture:
    if body.session_id is not None and body.model_seq_id is not None:
        return _create_from_checkpoint(body, runtime, tenant)
    if body.model_id is None:
        raise bad_request("load_weights needs model_id (load into a model) or session_id + model_seq_id")
    model_id = body.model_id

    def build() -> Callable[[], Outcome]:
        run = runtime.live_model(model_id, tenant)
        checkpoint = _training_checkpoint(runtime, body.path, tenant)
        source = runtime.store.get(TrainingRunRow, checkpoint.training_run_id)
        if source is None or source.base_model != run.base_model:
            raise bad_request(f"{body.path} was not trained on {run.base_model}")

        def run_load() -> Outcome:
            runtime.engine.remove_adapter(model_id)
            runtime.engine.load_state(model_id, Path(checkpoint.directory), optimizer=body.optimizer)
            return Outcome(result=LoadWeightsResponse(path=body.path, model_id=model_id))

        return run_load

    return enqueue(runtime, tenant, model_id, body.seq_id, "LoadWeights", build)


def _training_checkpoint(runtime: Runtime, path: str, tenant: str) -> CheckpointRow:
    checkpoint = runtime.checkpoint(path, tenant)
    if checkpoint.checkpoint_type != "training":
        raise bad_request(f"{path} is a {checkpoint.checkpoint_type} checkpoint; loading a training state needs "
                          "one made by save_state (tinker://.../weights/...)")
    return checkpoint


def _create_from_checkpoint(body: LoadWeightsRequest, runtime: Runtime, tenant: str) -> UntypedAPIFuture:
    model_id = f"{body.session_id}:train:{body.model_seq_id}"
    if runtime.owns_model(model_id, tenant) and (existing := runtime.scheduler.existing(model_id, 0)) is not None:
        return UntypedAPIFuture(request_id=existing, model_id=model_id)
    runtime.active_session(body.session_id, tenant)  # type: ignore[arg-type]
    checkpoint = _training_checkpoint(runtime, body.path, tenant)
    source = runtime.store.get(TrainingRunRow, checkpoint.training_run_id)
    if source is None:
        raise not_found(f"training run {checkpoint.training_run_id!r}")
    if body.base_model is not None and body.base_model != source.base_model:
        raise bad_request(f"{body.path} was trained on {source.base_model}, not {body.base_model}")
    if runtime.store.get(TrainingRunRow, model_id) is not None:
        raise bad_request(f"model {model_id!r} already exists")
    runtime.open_model(TrainingRunRow(
        id=model_id, tenant=tenant, session_id=body.session_id, base_model=source.base_model,
        lora_rank=source.lora_rank, seed=source.seed, train_mlp=source.train_mlp, train_attn=source.train_attn,
        train_unembed=source.train_unembed, user_metadata=body.user_metadata or source.user_metadata))

    def run() -> Outcome:
        try:
            runtime.engine.load_state(model_id, Path(checkpoint.directory), optimizer=body.optimizer)
        except Exception:  # no model came of it: do not list a run that never existed
            runtime.discard_run(model_id)
            raise
        return Outcome(result=LoadWeightsResponse(path=body.path, model_id=model_id))

    return enqueue(runtime, tenant, model_id, 0, "LoadWeights", lambda: run, bounded=False)  # as create_model


@router.post("/unload_model")
def unload_model(body: UnloadModelRequest, runtime: RuntimeDep, tenant: TenantDep) -> UntypedAPIFuture:
    def build() -> Callable[[], Outcome]:
        runtime.live_model(body.model_id, tenant)

        def run() -> Outcome:
            runtime.engine.remove_adapter(body.model_id)
            runtime.scheduler.close_model(body.model_id)
            return Outcome(result=UnloadModelResponse(model_id=body.model_id))

        return run

    return enqueue(runtime, tenant, body.model_id, None, "UnloadModel", build)

