"""TrainingClient: forward/backward passes, optimizer steps and checkpoints of one LoRA model."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import zstandard

from ..types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadWeightsResponse,
    LossFnType,
    OptimParams,
    OptimParamsBase,
    OptimStepResponse,
    SamplingClientKind,
    SaveWeightsExternalResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    UntypedAPIFuture,
    decode_forward_backward_output,
    encode_forward_backward_request,
)
from . import _custom_loss
from . import telemetry as _events
from ._chunking import chunk_data, combine_outputs
from ._constants import CONSOLE_URL
from ._futures import APIFuture, AwaitableConcurrentFuture, poll_result, sdk_method, validate
from .queue_state import QueueStateTracker
from ._tokenizer import get_tokenizer

if TYPE_CHECKING:
    from ._holder import Holder
    from .sampling_client import BackcompatSamplingClientFuture, RetryConfig, SamplingClient

logger = logging.getLogger("tinkex")


def _as_datum(datum: Any) -> Datum:
    if isinstance(datum, Datum):
        return datum
    if isinstance(datum, Mapping):
        return Datum.model_validate(datum)
    # An object shaped like a Datum (e.g. the official SDK's dataclass): take its fields.
    fields = {name: getattr(datum, name) for name in ("model_input", "loss_fn_inputs") if hasattr(datum, name)}
    if "model_input" in fields and not isinstance(fields["model_input"], Mapping):
        model_input = fields["model_input"]
        fields["model_input"] = model_input.model_dump() if hasattr(model_input, "model_dump") else model_input
    return Datum.model_validate(fields)


class QueueStateLogger(QueueStateTracker):
    """The queue state of a training operation: one log line per change (see `queue_state`)."""

    def __init__(self, what: str, grace_s: float | None = None, *, resource: str | None = None):
        super().__init__("training", resource or what, label=what)


class TrainingClient:
    """Trains one model. Every operation returns an APIFuture at once; requests reach the server
    in call order (seq_id = request number + 1), each after the previous one was accepted."""

    def __init__(self, holder: Holder, model_seq_id: int, model_id: str, *, info: GetInfoResponse):
        self.holder = holder
        self.model_id = model_id
        self.model_seq_id = model_seq_id
        self._info = info
        self._id_lock = threading.Lock()
        self._next_request_id = 0
        self._turn = 0
        self._turn_changed: asyncio.Condition | None = None
        self._poisoned: str | None = None
        self._queue_logger = QueueStateLogger(f"Training of {model_id}", resource=model_id)

    # ---- ordering ----------------------------------------------------------------------------

    def _reserve(self, count: int = 1) -> int:
        """Take `count` consecutive request ids (in call order); seq_id is request id + 1."""
        if self._poisoned:
            raise RuntimeError(f"this TrainingClient can no longer be used: {self._poisoned}")
        with self._id_lock:
            first = self._next_request_id
            self._next_request_id += count
            return first

    def _condition(self) -> asyncio.Condition:
        if self._turn_changed is None:
            self._turn_changed = asyncio.Condition()
        return self._turn_changed

    async def _wait_turn(self, request_id: int) -> None:
        condition = self._condition()
        async with condition:
            await condition.wait_for(lambda: self._turn >= request_id)

    async def _end_turn(self, request_id: int) -> None:
        condition = self._condition()
        async with condition:
            self._turn = max(self._turn, request_id + 1)
            condition.notify_all()

    async def _submit(self, request_id: int, path: str, *, json: Any = None, content: bytes | None = None,
                      headers: dict[str, str] | None = None) -> tuple[UntypedAPIFuture, float]:
        """POST a future-returning request once every lower request id has been accepted."""
        await self._wait_turn(request_id)
        try:
            if self._poisoned:
                raise RuntimeError(f"this TrainingClient can no longer be used: {self._poisoned}")
            started = time.monotonic()
            response = await self.holder.execute_with_retries(
                lambda: self.holder.transport.request("POST", path, purpose="train", json=json, content=content,
                                                      headers=headers))
            return validate(response, UntypedAPIFuture), time.monotonic() - started
        finally:
            await self._end_turn(request_id)

    async def _skip(self, request_ids: Sequence[int]) -> None:
        for request_id in request_ids:
            await self._wait_turn(request_id)
            await self._end_turn(request_id)

    async def _simple(self, request_id: int, path: str, body: dict[str, Any], request_type: str, model: Any) -> Any:
        future, roundtrip = await self._submit(request_id, path, json=body)
        return await poll_result(self.holder, future.request_id, request_type, result_model=model,
                                 roundtrip_s=roundtrip, on_queue_state=self._queue_logger)

    # ---- forward / backward ------------------------------------------------------------------

    def _chunks(self, data: Sequence[Any]) -> list[list[Datum]]:
        config = self.holder.client_config
        return chunk_data([_as_datum(d) for d in data], config.fwdbwd_max_chunk_len,
                          config.fwdbwd_max_chunk_bytes_count)

    async def _run_chunks(self, first_id: int, chunks: list[list[Datum]], loss_fn: str,
                          loss_fn_config: Mapping[str, float | str] | None, forward_only: bool) -> ForwardBackwardOutput:
        compress = self.holder.client_config.proto_compress_fwdbwd
        headers = {"content-type": "application/x-protobuf"}
        if compress:
            headers["content-encoding"] = "zstd"
        request_type = "Forward" if forward_only else "ForwardBackward"
        polls: list[asyncio.Task[ForwardBackwardOutput]] = []
        try:
            for index, chunk in enumerate(chunks):
                request_id = first_id + index
                body = encode_forward_backward_request(self.model_id, request_id + 1, chunk, loss_fn,
                                                       dict(loss_fn_config) if loss_fn_config else None,
                                                       forward_only=forward_only)
                if compress:
                    body = zstandard.ZstdCompressor().compress(body)
                try:
                    future, roundtrip = await self._submit(request_id, "/api/v1/forward_backward", content=body,
                                                           headers=headers)
                except BaseException:
                    await self._skip(range(request_id + 1, first_id + len(chunks)))
                    raise
                polls.append(asyncio.ensure_future(poll_result(
                    self.holder, future.request_id, request_type, proto_decoder=decode_forward_backward_output,
                    roundtrip_s=roundtrip, on_queue_state=self._queue_logger)))
            results = await asyncio.gather(*polls)
        except BaseException:
            for task in polls:
                task.cancel()
            raise
        return combine_outputs(results)

    def _fwdbwd(self, data: list[Datum], loss_fn: str, loss_fn_config: Mapping[str, float | str] | None,
                forward_only: bool) -> APIFuture[ForwardBackwardOutput]:
        chunks = self._chunks(data)
        if not chunks:
            raise ValueError("forward_backward needs at least one datum")
        first = self._reserve(len(chunks))
        return self.holder.run(self._run_chunks(first, chunks, loss_fn, loss_fn_config, forward_only))

    @sdk_method("TrainingClient.forward")
    def forward(self, data: list[Datum], loss_fn: LossFnType,
                loss_fn_config: Mapping[str, float | str] | None = None) -> APIFuture[ForwardBackwardOutput]:
        """The loss and per-datum outputs without gradients."""
        return self._fwdbwd(data, loss_fn, loss_fn_config, forward_only=True)

    @sdk_method("TrainingClient.forward_async")
    async def forward_async(self, data: list[Datum], loss_fn: LossFnType,
                            loss_fn_config: Mapping[str, float | str] | None = None) -> APIFuture[ForwardBackwardOutput]:
        return self.forward(data, loss_fn, loss_fn_config)

    @sdk_method("TrainingClient.forward_backward")
    def forward_backward(self, data: list[Datum], loss_fn: LossFnType,
                         loss_fn_config: Mapping[str, float | str] | None = None) -> APIFuture[ForwardBackwardOutput]:
        """Accumulate the gradients of `loss_fn` over `data` (applied by the next optim_step)."""
        return self._fwdbwd(data, loss_fn, loss_fn_config, forward_only=False)

    @sdk_method("TrainingClient.forward_backward_async")
    async def forward_backward_async(self, data: list[Datum], loss_fn: LossFnType,
                                     loss_fn_config: Mapping[str, float | str] | None = None
                                     ) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward(data, loss_fn, loss_fn_config)

    @sdk_method("TrainingClient.forward_backward_custom")
    def forward_backward_custom(self, data: list[Datum], loss_fn: _custom_loss.CustomLossFnV1 | _custom_loss.LossHandle,
                                *, loss_type_input: Literal["logprobs"] | None = None
                                ) -> APIFuture[ForwardBackwardOutput]:
        """A custom loss over per-datum logprobs, computed here with torch (see `_custom_loss`)."""
        if loss_type_input not in (None, "logprobs"):
            raise ValueError("loss_type_input can only be 'logprobs'")
        if isinstance(loss_fn, _custom_loss.LossHandle) and loss_fn.loss_id is not None:
            return self.forward_backward(data, "custom", {"loss_id": loss_fn.loss_id})
        original = [_as_datum(d) for d in data]
        fwd = _custom_loss.forward_data(original)
        config = self.holder.client_config
        chunks = chunk_data(fwd, config.fwdbwd_max_chunk_len, config.fwdbwd_max_chunk_bytes_count)
        first = self._reserve(2 * len(chunks))
        return self.holder.run(self._run_custom(first, original, chunks, loss_fn))

    @sdk_method("TrainingClient.forward_backward_custom_async")
    async def forward_backward_custom_async(self, data: list[Datum],
                                            loss_fn: _custom_loss.CustomLossFnV1 | _custom_loss.LossHandle, *,
                                            loss_type_input: Literal["logprobs"] | None = None
                                            ) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward_custom(data, loss_fn, loss_type_input=loss_type_input)

    async def _run_custom(self, first: int, original: list[Datum], chunks: list[list[Datum]],
                          loss_fn: Any) -> ForwardBackwardOutput:
        with _events.span(_events.FORWARD_BACKWARD_CUSTOM, model_id=self.model_id, datums=len(original),
                          chunks=len(chunks)) as attrs:
            result = await self._run_custom_inner(first, original, chunks, loss_fn)
            attrs["loss"] = result.metrics.get("loss:sum")
            return result

    async def _run_custom_inner(self, first: int, original: list[Datum], chunks: list[list[Datum]],
                                loss_fn: Any) -> ForwardBackwardOutput:
        n = len(chunks)
        backward_started = False
        try:
            forward = await self._run_chunks(first, chunks, "cross_entropy", None, forward_only=True)
            logprobs = _custom_loss.leaf_logprobs(forward.loss_fn_outputs, original)
            loss_value, user_metrics, weights = await asyncio.to_thread(
                _custom_loss.compute_custom_loss, loss_fn, original, logprobs)
            bwd = _custom_loss.backward_data(original, weights)
            bwd_chunks, start = [], 0
            for chunk in chunks:  # the same boundaries as the forward pass
                bwd_chunks.append(bwd[start:start + len(chunk)])
                start += len(chunk)
            backward_started = True
            result = await self._run_chunks(first + n, bwd_chunks, "cross_entropy", None, forward_only=False)
        except BaseException as exc:
            self._poisoned = f"a forward_backward_custom call failed ({type(exc).__name__}: {exc})"
            if not backward_started:
                await self._skip(range(first + n, first + 2 * n))
            raise
        metrics = dict(result.metrics)
        surrogate = metrics.pop("loss:sum", None)
        metrics["loss:sum"] = loss_value
        if surrogate is not None:
            metrics["surrogate_loss:sum"] = surrogate
        metrics.update(user_metrics)
        return ForwardBackwardOutput(loss_fn_output_type=result.loss_fn_output_type,
                                     loss_fn_outputs=result.loss_fn_outputs, metrics=metrics)

    # ---- optimizer ---------------------------------------------------------------------------

    @sdk_method("TrainingClient.optim_step")
    def optim_step(self, optim_params: OptimParams | None = None, *,
                   adam_params: AdamParams | None = None) -> APIFuture[OptimStepResponse]:
        """Apply the accumulated gradients. Give the step's parameters positionally or as adam_params=."""
        if (optim_params is None) == (adam_params is None):
            raise TypeError("optim_step takes exactly one of optim_params or adam_params")
        params = optim_params if optim_params is not None else adam_params
        if isinstance(params, Mapping):
            params = AdamParams.model_validate(params) if params.get("type") in (None, "adam") \
                else OptimParamsBase.model_validate(params)
        if isinstance(params, AdamParams):
            field_name = "adam_params"
        elif isinstance(params, OptimParamsBase):
            field_name = "optimizer_params"
        elif hasattr(params, "learning_rate") and hasattr(params, "beta1"):  # an AdamParams from elsewhere
            params, field_name = AdamParams.model_validate(params, from_attributes=True), "adam_params"
        else:
            raise ValueError(f"unsupported optimizer parameters: {type(params).__name__}")
        request_id = self._reserve()
        body = {"model_id": self.model_id, "seq_id": request_id + 1, "type": "optim_step",
                field_name: params.to_json_dict()}
        return self.holder.run(self._simple(request_id, "/api/v1/optim_step", body, "OptimStep", OptimStepResponse))

    @sdk_method("TrainingClient.optim_step_async")
    async def optim_step_async(self, optim_params: OptimParams | None = None, *,
                               adam_params: AdamParams | None = None) -> APIFuture[OptimStepResponse]:
        return self.optim_step(optim_params, adam_params=adam_params)

    # ---- checkpoints -------------------------------------------------------------------------

    @sdk_method("TrainingClient.save_state")
    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                   user_metadata: dict[str, str] | None = None) -> APIFuture[SaveWeightsResponse]:
        """Save weights and optimizer state as `tinker://<run>/weights/<name>`."""
        request_id = self._reserve()
        body = _drop_none({"model_id": self.model_id, "path": name, "seq_id": request_id + 1,
                           "ttl_seconds": ttl_seconds, "overwrite": overwrite, "user_metadata": user_metadata,
                           "type": "save_weights"})
        return self.holder.run(self._simple(request_id, "/api/v1/save_weights", body, "SaveWeights",
                                            SaveWeightsResponse))

    @sdk_method("TrainingClient.save_state_async")
    async def save_state_async(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                               user_metadata: dict[str, str] | None = None) -> APIFuture[SaveWeightsResponse]:
        return self.save_state(name, ttl_seconds, overwrite, user_metadata)

    def _load(self, path: str, optimizer: bool, weights_access_token: str | None) -> APIFuture[LoadWeightsResponse]:
        request_id = self._reserve()
        body = _drop_none({"model_id": self.model_id, "seq_id": request_id + 1, "path": path, "optimizer": optimizer,
                           "weights_access_token": weights_access_token, "type": "load_weights"})
        return self.holder.run(self._simple(request_id, "/api/v1/load_weights", body, "LoadWeights",
                                            LoadWeightsResponse))

    @sdk_method("TrainingClient.load_state")
    def load_state(self, path: str, weights_access_token: str | None = None) -> APIFuture[LoadWeightsResponse]:
        """Load weights from a checkpoint into this model (the optimizer state is reset)."""
        return self._load(path, False, weights_access_token)

    @sdk_method("TrainingClient.load_state_async")
    async def load_state_async(self, path: str, weights_access_token: str | None = None
                               ) -> APIFuture[LoadWeightsResponse]:
        return self.load_state(path, weights_access_token)

    @sdk_method("TrainingClient.load_state_with_optimizer")
    def load_state_with_optimizer(self, path: str, weights_access_token: str | None = None
                                  ) -> APIFuture[LoadWeightsResponse]:
        """Load weights and optimizer state from a checkpoint into this model."""
        return self._load(path, True, weights_access_token)

    @sdk_method("TrainingClient.load_state_with_optimizer_async")
    async def load_state_with_optimizer_async(self, path: str, weights_access_token: str | None = None
                                              ) -> APIFuture[LoadWeightsResponse]:
        return self.load_state_with_optimizer(path, weights_access_token)

    @sdk_method("TrainingClient.save_weights_for_sampler")
    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None,
                                 user_metadata: dict[str, str] | None = None
                                 ) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Save sampler weights as `tinker://<run>/sampler_weights/<name>`."""
        request_id = self._reserve()
        body = _drop_none({"model_id": self.model_id, "path": name, "kind": "snapshot", "seq_id": request_id + 1,
                           "ttl_seconds": ttl_seconds, "user_metadata": user_metadata,
                           "type": "save_weights_for_sampler"})
        return self.holder.run(self._simple(request_id, "/api/v1/save_weights_for_sampler", body,
                                            "SaveWeightsForSampler", SaveWeightsForSamplerResponse))

    @sdk_method("TrainingClient.save_weights_for_sampler_async")
    async def save_weights_for_sampler_async(self, name: str, ttl_seconds: int | None = None,
                                             user_metadata: dict[str, str] | None = None
                                             ) -> APIFuture[SaveWeightsForSamplerResponse]:
        return self.save_weights_for_sampler(name, ttl_seconds, user_metadata)

    @sdk_method("TrainingClient.save_weights_external")
    def save_weights_external(self, name: str, ttl_seconds: int | None = None,
                              age_encryption_recipients: list[str] | None = None
                              ) -> APIFuture[SaveWeightsExternalResponse]:
        """Export Hugging Face format weights as `tinker://<run>/external_weights/<name>`."""
        if age_encryption_recipients is not None and len(age_encryption_recipients) > 10:
            raise ValueError("at most 10 age encryption recipients")
        request_id = self._reserve()
        body = _drop_none({"model_id": self.model_id, "path": name, "seq_id": request_id + 1,
                           "ttl_seconds": ttl_seconds, "age_encryption_recipients": age_encryption_recipients,
                           "type": "save_weights_external"})
        return self.holder.run(self._simple(request_id, "/api/v1/save_weights_external", body, "SaveWeightsExternal",
                                            SaveWeightsExternalResponse))

    @sdk_method("TrainingClient.save_weights_external_async")
    async def save_weights_external_async(self, name: str, ttl_seconds: int | None = None,
                                          age_encryption_recipients: list[str] | None = None
                                          ) -> APIFuture[SaveWeightsExternalResponse]:
        return self.save_weights_external(name, ttl_seconds, age_encryption_recipients)

    # ---- sampling ----------------------------------------------------------------------------

    @sdk_method("TrainingClient.save_weights_and_get_sampling_client")
    def save_weights_and_get_sampling_client(self, name: str | None = None, retry_config: RetryConfig | None = None,
                                             record_stability_info: bool = False,
                                             kind: SamplingClientKind = "snapshot") -> BackcompatSamplingClientFuture:
        """Save the current weights (unnamed, ephemeral) and return a SamplingClient for them."""
        from .sampling_client import BackcompatSamplingClientFuture, SamplingClient

        request_id = self._reserve()
        sampling_seq = self.holder.next_sampling_session_seq_id()
        body = {"model_id": self.model_id, "sampling_session_seq_id": sampling_seq, "kind": kind,
                "seq_id": request_id + 1, "type": "save_weights_for_sampler"}

        async def run() -> SamplingClient:
            result = await self._simple(request_id, "/api/v1/save_weights_for_sampler", body,
                                        "SaveWeightsForSampler", SaveWeightsForSamplerResponse)
            if not result.sampling_session_id:
                raise ValueError("the server saved the weights but returned no sampling_session_id")
            return SamplingClient(self.holder, sampling_session_id=result.sampling_session_id,
                                  base_model=self._base_model(), retry_config=retry_config,
                                  record_stability_info=record_stability_info)

        return BackcompatSamplingClientFuture(self.holder.run(run()).future())

    @sdk_method("TrainingClient.save_weights_and_get_sampling_client_async")
    async def save_weights_and_get_sampling_client_async(self, name: str | None = None,
                                                         retry_config: RetryConfig | None = None,
                                                         record_stability_info: bool = False,
                                                         kind: SamplingClientKind = "snapshot") -> SamplingClient:
        return await self.save_weights_and_get_sampling_client(name, retry_config, record_stability_info, kind)

    @sdk_method("TrainingClient.create_sampling_client")
    def create_sampling_client(self, model_path: str, retry_config: RetryConfig | None = None,
                               record_stability_info: bool = False) -> BackcompatSamplingClientFuture:
        from .sampling_client import BackcompatSamplingClientFuture, SamplingClient

        future = SamplingClient.create(self.holder, model_path=model_path, retry_config=retry_config,
                                       record_stability_info=record_stability_info)
        return BackcompatSamplingClientFuture(future.future())

    @sdk_method("TrainingClient.create_sampling_client_async")
    async def create_sampling_client_async(self, model_path: str, retry_config: RetryConfig | None = None,
                                           record_stability_info: bool = False) -> SamplingClient:
        return await self.create_sampling_client(model_path, retry_config, record_stability_info)

    # ---- information -------------------------------------------------------------------------

    def _base_model(self) -> str:
        return self._info.model_data.model_name or self._info.model_name or ""

    def get_info(self) -> GetInfoResponse:
        """The model's information (fetched when the client was created; no request)."""
        return self._info

    async def get_info_async(self) -> GetInfoResponse:
        return self._info

    def get_tokenizer(self) -> Any:
        """The base model's tokenizer (a Hugging Face tokenizer, cached)."""
        data = self._info.model_data
        if not data.model_name:
            raise ValueError("the server did not report this model's name, so its tokenizer is unknown")
        return get_tokenizer(data.model_name, data.tokenizer_id)

    def get_console_url(self) -> str:
        return f"{CONSOLE_URL}/training_runs/{self.model_id}"

    def get_telemetry(self) -> Any:
        return self.holder.telemetry

    def __repr__(self) -> str:
        return f"TrainingClient(model_id={self.model_id!r})"


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if value is not None}


class BackcompatTrainingClientFuture(AwaitableConcurrentFuture[TrainingClient]):
    """An APIFuture[TrainingClient] that also answers TrainingClient's methods (waiting for it first)."""


def _forwarder(name: str, is_async: bool) -> Any:
    if is_async:
        async def forward_async(self: BackcompatTrainingClientFuture, *args: Any, **kwargs: Any) -> Any:
            client = await self.result_async()
            return await getattr(client, name)(*args, **kwargs)
        forward_async.__name__ = name
        return forward_async

    def forward(self: BackcompatTrainingClientFuture, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.result(), name)(*args, **kwargs)
    forward.__name__ = name
    return forward


for _name, _value in list(vars(TrainingClient).items()):
    if not _name.startswith("_") and callable(_value):
        setattr(BackcompatTrainingClientFuture, _name,
                _forwarder(_name, asyncio.iscoroutinefunction(getattr(_value, "__wrapped__", _value))))
