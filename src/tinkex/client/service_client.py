"""ServiceClient: the entry point. Opens a session and creates training, sampling and REST clients."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal

from ..types import (
    AdamOptimizerConfig,
    CreateModelResponse,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoadWeightsResponse,
    LoraConfig,
    OptimizerConfig,
    UntypedAPIFuture,
)
from . import _custom_loss, _loop
from ._config import resolve
from ._constants import CONSOLE_URL
from ._futures import APIFuture, AwaitableConcurrentFuture, completed_future, poll_result, run_in_sdk_loop, sdk_method, validate
from ._holder import Holder
from .rest_client import RestClient
from .sampling_client import BackcompatSamplingClientFuture, RetryConfig, SamplingClient
from .training_client import BackcompatTrainingClientFuture, QueueStateLogger, TrainingClient


def _optimizer_json(optimizer: Any) -> dict[str, Any]:
    if optimizer is None:
        return AdamOptimizerConfig().to_json_dict()
    if isinstance(optimizer, Mapping):
        return dict(optimizer)
    if hasattr(optimizer, "model_dump"):
        return optimizer.model_dump(mode="json", exclude_none=True)
    raise TypeError(f"unsupported optimizer config {type(optimizer).__name__}")


class ServiceClient:
    """Connects to a Tinker-compatible server; creates no session until one is needed.

    With no base URL and no API key configured, it starts the embedded tinkex server.
    """

    def __init__(self, user_metadata: dict[str, str] | None = None, project_id: str | None = None, *,
                 display_name: str | None = None, base_url: str | None = None, api_key: str | None = None,
                 default_headers_overrides: Mapping[str, str] | None = None, **kwargs: Any):
        if kwargs:
            warnings.warn(f"ServiceClient ignores unknown arguments: {sorted(kwargs)}", FutureWarning, stacklevel=2)
        import os

        self._user_metadata = user_metadata
        self.project_id = project_id or os.environ.get("TINKER_PROJECT_ID") or None
        self._display_name = display_name
        self._base_url = base_url
        self._api_key = api_key
        self._headers = dict(default_headers_overrides or {})
        self._holder: Holder | None = None
        self._holder_lock = threading.Lock()
        self._closed: AwaitableConcurrentFuture[None] | None = None

    @property
    def holder(self) -> Holder:
        """The session holder (created on first use)."""
        if self._holder is None:
            with self._holder_lock:
                if self._holder is None:
                    self._holder = Holder(resolve(self._base_url, self._api_key), with_session=True,
                                          default_headers_overrides=self._headers,
                                          user_metadata=self._user_metadata, project_id=self.project_id,
                                          display_name=self._display_name)
        return self._holder

    @property
    def session_id(self) -> str | None:
        return self._holder.session_id if self._holder is not None else None

    # ---- training clients --------------------------------------------------------------------

    async def _finish_training_client(self, model_seq_id: int, model_id: str) -> TrainingClient:
        holder = self.holder
        response = await holder.execute_with_retries(lambda: holder.transport.request(
            "POST", "/api/v1/get_info", purpose="train", json={"model_id": model_id, "type": "get_info"}))
        info = validate(response, GetInfoResponse)
        return TrainingClient(holder, model_seq_id, model_id, info=info)

    @sdk_method("ServiceClient.create_lora_training_client")
    def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None,
                                    train_mlp: bool = True, train_attn: bool = True, train_unembed: bool = True,
                                    user_metadata: dict[str, str] | None = None,
                                    optimizer: OptimizerConfig | None = None) -> BackcompatTrainingClientFuture:
        """Create a LoRA adapter on `base_model` and return a TrainingClient for it."""
        if not (train_mlp or train_attn or train_unembed):
            raise ValueError("At least one of train_mlp, train_attn or train_unembed must be True")
        holder = self.holder
        model_seq_id = holder.next_model_seq_id()
        lora = LoraConfig(rank=rank, seed=seed, train_unembed=train_unembed, train_mlp=train_mlp,
                          train_attn=train_attn)

        async def run() -> TrainingClient:
            await holder.ensure_ready()
            body: dict[str, Any] = {"session_id": holder.session_id, "model_seq_id": model_seq_id,
                                    "base_model": base_model, "lora_config": lora.to_json_dict(),
                                    "optimizer_config": _optimizer_json(optimizer), "type": "create_model"}
            if user_metadata is not None:
                body["user_metadata"] = user_metadata
            response = await holder.execute_with_retries(lambda: holder.transport.request(
                "POST", "/api/v1/create_model", purpose="train", json=body))
            future = validate(response, UntypedAPIFuture)
            result = await poll_result(holder, future.request_id, "CreateModel", result_model=CreateModelResponse,
                                       on_queue_state=QueueStateLogger(f"Model creation of {base_model}"))
            return await self._finish_training_client(model_seq_id, result.model_id)

        return BackcompatTrainingClientFuture(holder.run(run()).future())

    @sdk_method("ServiceClient.create_lora_training_client_async")
    async def create_lora_training_client_async(self, base_model: str, rank: int = 32, seed: int | None = None,
                                                train_mlp: bool = True, train_attn: bool = True,
                                                train_unembed: bool = True, user_metadata: dict[str, str] | None = None,
                                                optimizer: OptimizerConfig | None = None) -> TrainingClient:
        return await self.create_lora_training_client(base_model, rank, seed, train_mlp, train_attn, train_unembed,
                                                      user_metadata, optimizer)

    def _from_state(self, path: str, base_model: str | None, user_metadata: dict[str, str] | None,
                    weights_access_token: str | None, optimizer: OptimizerConfig | None,
                    with_optimizer: bool) -> BackcompatTrainingClientFuture:
        holder = self.holder
        model_seq_id = holder.next_model_seq_id()

        async def run() -> TrainingClient:
            await holder.ensure_ready()
            body: dict[str, Any] = {"session_id": holder.session_id, "model_seq_id": model_seq_id, "path": path,
                                    "optimizer": with_optimizer, "type": "load_weights"}
            for key, value in (("base_model", base_model), ("user_metadata", user_metadata),
                               ("weights_access_token", weights_access_token)):
                if value is not None:
                    body[key] = value
            if optimizer is not None:
                body["optimizer_config"] = _optimizer_json(optimizer)
            response = await holder.execute_with_retries(lambda: holder.transport.request(
                "POST", "/api/v1/load_weights", purpose="train", json=body))
            future = validate(response, UntypedAPIFuture)
            result = await poll_result(holder, future.request_id, "LoadWeights", result_model=LoadWeightsResponse)
            model_id = result.model_id or future.model_id or f"{holder.session_id}:train:{model_seq_id}"
            return await self._finish_training_client(model_seq_id, model_id)

        return BackcompatTrainingClientFuture(holder.run(run()).future())

    @sdk_method("ServiceClient.create_training_client_from_state")
    def create_training_client_from_state(self, path: str, base_model: str | None = None,
                                          user_metadata: dict[str, str] | None = None,
                                          weights_access_token: str | None = None,
                                          optimizer: OptimizerConfig | None = None) -> BackcompatTrainingClientFuture:
        """A new training run starting from the weights of a checkpoint (fresh optimizer)."""
        return self._from_state(path, base_model, user_metadata, weights_access_token, optimizer, False)

    @sdk_method("ServiceClient.create_training_client_from_state_async")
    async def create_training_client_from_state_async(self, path: str, base_model: str | None = None,
                                                      user_metadata: dict[str, str] | None = None,
                                                      weights_access_token: str | None = None,
                                                      optimizer: OptimizerConfig | None = None) -> TrainingClient:
        return await self.create_training_client_from_state(path, base_model, user_metadata, weights_access_token,
                                                            optimizer)

    @sdk_method("ServiceClient.create_training_client_from_state_with_optimizer")
    def create_training_client_from_state_with_optimizer(self, path: str, base_model: str | None = None,
                                                         user_metadata: dict[str, str] | None = None,
                                                         weights_access_token: str | None = None
                                                         ) -> BackcompatTrainingClientFuture:
        """A new training run resuming weights and optimizer state from a checkpoint."""
        return self._from_state(path, base_model, user_metadata, weights_access_token, None, True)

    @sdk_method("ServiceClient.create_training_client_from_state_with_optimizer_async")
    async def create_training_client_from_state_with_optimizer_async(
            self, path: str, base_model: str | None = None, user_metadata: dict[str, str] | None = None,
            weights_access_token: str | None = None) -> TrainingClient:
        return await self.create_training_client_from_state_with_optimizer(path, base_model, user_metadata,
                                                                           weights_access_token)

    # ---- sampling ----------------------------------------------------------------------------

    @sdk_method("ServiceClient.create_sampling_client")
    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None,
                               retry_config: RetryConfig | None = None,
                               record_stability_info: bool = False) -> BackcompatSamplingClientFuture:
        """A SamplingClient for saved sampler weights (`model_path`) or a base model."""
        if model_path is None and base_model is None:
            raise ValueError("Either model_path or base_model must be provided")
        future = SamplingClient.create(self.holder, model_path=model_path, base_model=base_model,
                                       retry_config=retry_config, record_stability_info=record_stability_info)
        return BackcompatSamplingClientFuture(future.future())

    @sdk_method("ServiceClient.create_sampling_client_async")
    async def create_sampling_client_async(self, model_path: str | None = None, base_model: str | None = None,
                                           retry_config: RetryConfig | None = None,
                                           record_stability_info: bool = False) -> SamplingClient:
        return await self.create_sampling_client(model_path, base_model, retry_config, record_stability_info)

    # ---- custom losses -----------------------------------------------------------------------

    @sdk_method("ServiceClient.create_custom_loss")
    def create_custom_loss(self, fn: _custom_loss.PerDatumLossFn, input_ranks: Mapping[str, Literal[0, 1, 2]]
                           ) -> APIFuture[_custom_loss.LossHandle]:
        """Trace a per-datum loss `fn(logprobs, *inputs) -> (loss, metrics)` into a LossHandle.

        The handle runs on this client in forward_backward_custom (tinkex does not upload losses).
        """
        holder = self.holder

        async def run() -> _custom_loss.LossHandle:
            await holder.ensure_ready()
            return _custom_loss.trace_loss(fn, input_ranks, holder.session_id or "")

        return holder.run(run())

    # ---- REST conveniences -------------------------------------------------------------------

    def create_rest_client(self) -> RestClient:
        """A RestClient on the same server and credential."""
        from ._holder import sessionless_holder

        holder = self.holder
        return RestClient(sessionless_holder(holder.connection.base_url, holder.connection.api_key))

    @sdk_method("ServiceClient.get_server_capabilities")
    def get_server_capabilities(self) -> GetServerCapabilitiesResponse:
        """The models this server offers (blocking)."""
        return self.create_rest_client().get_server_capabilities().result()

    @sdk_method("ServiceClient.get_server_capabilities_async")
    async def get_server_capabilities_async(self) -> GetServerCapabilitiesResponse:
        return await self.create_rest_client().get_server_capabilities()

    @sdk_method("ServiceClient.copy_weights")
    def copy_weights(self, path: str, *, ttl_seconds: int | None = None,
                     weights_access_token: str | None = None) -> APIFuture[str]:
        return self.create_rest_client().copy_weights(path, self.project_id, ttl_seconds=ttl_seconds,
                                                      weights_access_token=weights_access_token)

    # ---- lifetime ----------------------------------------------------------------------------

    def close(self, status: Literal["success", "errored", "interrupted"] = "success",
              detail: str | None = None) -> AwaitableConcurrentFuture[None]:
        """Finish the session on the server, stop the heartbeat, flush telemetry (idempotent)."""
        if self._closed is None:
            if self._holder is None:
                self._closed = completed_future(None)
            else:
                self._closed = run_in_sdk_loop(self._holder.close(status, detail))
        return self._closed

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc_value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc_type is None:
            status = "success"
        elif issubclass(exc_type, Exception):
            status = "errored"
        else:
            status = "interrupted"
        future = self.close(status, None if exc_value is None else f"{exc_type.__name__}: {exc_value}")
        if not _loop.on_sdk_loop():
            future.result(60)

    def get_console_url(self) -> str:
        session = self.session_id
        return f"{CONSOLE_URL}/sessions/{session}" if session else f"{CONSOLE_URL}/sessions"

    def get_telemetry(self) -> Any:
        return self.holder.telemetry

    def __repr__(self) -> str:
        return f"ServiceClient(session_id={self.session_id!r})"
