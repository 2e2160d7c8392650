"""SamplingClient: text generation and prompt logprobs from a base model or saved weights."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from ..types import (
    APIConnectionError,
    APIStatusError,
    CreateSamplingSessionResponse,
    GetSamplerResponse,
    ImageChunk,
    JoinSamplingSessionResponse,
    ModelInput,
    SampleResponse,
    SamplingParams,
    TensorData,
    UntypedAPIFuture,
    decode_sample_response,
)
from ..types._exceptions import TinkerError
from . import rate_limit
from ._constants import SAMPLER_CLONE_STRIDE
from ._futures import (
    APIFuture,
    AwaitableConcurrentFuture,
    RetryableException,
    poll_result,
    sdk_method,
    validate,
)
from ._holder import HolderConfig, is_retryable, shadow_holder
from .queue_state import QueueStateTracker
from ._tokenizer import get_tokenizer

if TYPE_CHECKING:
    from ._holder import Holder

logger = logging.getLogger("tinkex")

BIG_PROMPT_BYTES = 128 * 1024


@dataclass
class RetryConfig:
    """How a SamplingClient retries whole sample requests."""

    max_connections: int = 1000
    progress_timeout: float = 7200.0
    retry_delay_base: float = 0.5
    retry_delay_max: float = 10.0
    jitter_factor: float = 0.25
    enable_retry_logic: bool = True
    enable_stuck_detection: bool = True
    retryable_exceptions: tuple[type[BaseException], ...] = (
        asyncio.TimeoutError, APIConnectionError, httpx.TimeoutException, RetryableException)

    def delay(self, attempt: int) -> float:
        base = min(self.retry_delay_base * 2.0**attempt, self.retry_delay_max)
        return max(0.0, base * (1.0 + self.jitter_factor * (2.0 * random.random() - 1.0)))


def _prompt_bytes(prompt: ModelInput) -> int:
    size = 0
    for chunk in prompt.chunks:
        if isinstance(chunk, ImageChunk):
            size += len(chunk.data)
        elif hasattr(chunk, "dmel"):
            size += len(chunk.dmel)
        else:
            try:
                size += 10 * chunk.length
            except ValueError:
                size += 10
    return size


class SamplingClient:
    """Samples from one sampling session. Picklable: a copy in another process reuses the session."""

    def __init__(self, holder: Holder, *, sampling_session_id: str, base_model: str, shadow: bool = False,
                 retry_config: RetryConfig | None = None, record_stability_info: bool = False):
        self.holder = holder
        self._sampling_session_id = sampling_session_id
        self._base_model = base_model
        self._shadow = shadow
        self._retry_config = retry_config or RetryConfig()
        self._record_stability_info = record_stability_info
        self._seq_lock = threading.Lock()
        self._clone_id: int | None = None if shadow else 0
        self._next_seq = 0
        self._join_lock: asyncio.Lock | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._limiter: rate_limit.TenantRateLimiter | None = None
        self._queue_tracker = QueueStateTracker("sampling", sampling_session_id)
        self.feature_gates = {"async_sampling"}

    @property
    def sampling_session_id(self) -> str:
        return self._sampling_session_id

    # ---- creation ----------------------------------------------------------------------------

    @staticmethod
    def create(holder: Holder, *, model_path: str | None = None, base_model: str | None = None,
               sampling_session_id: str | None = None, retry_config: RetryConfig | None = None,
               record_stability_info: bool = False) -> AwaitableConcurrentFuture[SamplingClient]:
        """Open a sampling session for a checkpoint (`tinker://.../sampler_weights/...`) or a base model."""
        if model_path is None and base_model is None and sampling_session_id is None:
            raise ValueError("Either model_path or base_model must be provided")
        if model_path is not None and not model_path.startswith("tinker://"):
            raise ValueError(f"model_path must start with tinker://, got {model_path!r}")
        sampling_seq = holder.next_sampling_session_seq_id() if sampling_session_id is None else None

        async def run() -> SamplingClient:
            await holder.ensure_ready()
            session_id = sampling_session_id
            if session_id is None:
                body: dict[str, Any] = {"session_id": holder.session_id, "sampling_session_seq_id": sampling_seq,
                                        "type": "create_sampling_session"}
                if base_model is not None:
                    body["base_model"] = base_model
                if model_path is not None:
                    body["model_path"] = model_path
                response = await holder.execute_with_retries(
                    lambda: holder.transport.request("POST", "/api/v1/create_sampling_session", purpose="sample",
                                                     json=body))
                session_id = validate(response, CreateSamplingSessionResponse).sampling_session_id
            model = base_model
            if model is None:
                response = await holder.execute_with_retries(
                    lambda: holder.transport.request("GET", f"/api/v1/samplers/{session_id}", purpose="rest"))
                model = validate(response, GetSamplerResponse).base_model
            return SamplingClient(holder, sampling_session_id=session_id, base_model=model,
                                  retry_config=retry_config, record_stability_info=record_stability_info)

        return holder.run(run())

    # ---- sequence numbers --------------------------------------------------------------------

    async def _ensure_clone_id(self) -> None:
        if self._clone_id is not None:
            return
        if self._join_lock is None:
            self._join_lock = asyncio.Lock()
        async with self._join_lock:
            if self._clone_id is not None:
                return
            clone_id = random.randint(1, SAMPLER_CLONE_STRIDE - 1)
            if self.holder.client_config.sample_join_sampling_session:
                response = await self.holder.execute_with_retries(lambda: self.holder.transport.request(
                    "POST", "/api/v1/join_sampling_session", purpose="sample",
                    json={"sampling_session_id": self._sampling_session_id, "type": "join_sampling_session"}))
                clone_id = validate(response, JoinSamplingSessionResponse).client_counter
            with self._seq_lock:
                self._clone_id = clone_id
                self._next_seq = clone_id * SAMPLER_CLONE_STRIDE

    def _take_seq_id(self) -> int:
        with self._seq_lock:
            value = self._next_seq
            self._next_seq += 1
            return value

    # ---- sampling ----------------------------------------------------------------------------

    @sdk_method("SamplingClient.sample")
    def sample(self, prompt: ModelInput, num_samples: int, sampling_params: SamplingParams,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, topk_sample_logprobs: int = 0,
               target_prompt_logprobs: TensorData | None = None, prompt_alt_tokens_k: int = 0,
               prompt_logprobs_last_n: int | None = None) -> APIFuture[SampleResponse]:
        """Generate `num_samples` continuations of `prompt`."""
        body = self._sample_body(prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs,
                                 topk_sample_logprobs, target_prompt_logprobs, prompt_alt_tokens_k,
                                 prompt_logprobs_last_n)
        return self.holder.run(self._sample_with_retries(body, _prompt_bytes(prompt), prompt_alt_tokens_k,
                                                         prompt_logprobs_last_n))

    @sdk_method("SamplingClient.sample_async")
    async def sample_async(self, prompt: ModelInput, num_samples: int, sampling_params: SamplingParams,
                           include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
                           topk_sample_logprobs: int = 0, target_prompt_logprobs: TensorData | None = None,
                           prompt_alt_tokens_k: int = 0, prompt_logprobs_last_n: int | None = None) -> SampleResponse:
        return await self.sample(prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs,
                                 topk_sample_logprobs, target_prompt_logprobs, prompt_alt_tokens_k,
                                 prompt_logprobs_last_n)

    def _sample_body(self, prompt: Any, num_samples: int, sampling_params: Any, include_prompt_logprobs: bool,
                     topk_prompt_logprobs: int, topk_sample_logprobs: int, target_prompt_logprobs: Any,
                     prompt_alt_tokens_k: int, prompt_logprobs_last_n: int | None) -> dict[str, Any]:
        if not isinstance(prompt, ModelInput):
            prompt = ModelInput.model_validate(prompt.model_dump() if hasattr(prompt, "model_dump") else prompt)
        if not isinstance(sampling_params, SamplingParams):
            sampling_params = SamplingParams.model_validate(
                sampling_params.model_dump() if hasattr(sampling_params, "model_dump") else sampling_params)
        if num_samples < 1:
            raise ValueError("num_samples must be at least 1")
        if prompt_alt_tokens_k < 0:
            raise ValueError("prompt_alt_tokens_k must be >= 0")
        if prompt_logprobs_last_n is not None:
            if prompt_logprobs_last_n < 1:
                raise ValueError("prompt_logprobs_last_n must be >= 1")
            if not include_prompt_logprobs:
                raise ValueError("prompt_logprobs_last_n requires include_prompt_logprobs=True")
        body: dict[str, Any] = {
            "num_samples": num_samples, "prompt": prompt.to_json_dict(),
            "sampling_params": sampling_params.to_json_dict(),
            "sampling_session_id": self._sampling_session_id, "seq_id": None,
            "prompt_logprobs": include_prompt_logprobs, "topk_prompt_logprobs": topk_prompt_logprobs,
            "topk_sample_logprobs": topk_sample_logprobs, "prompt_alt_tokens_k": prompt_alt_tokens_k,
            "record_stability_info": self._record_stability_info, "type": "sample",
        }
        if target_prompt_logprobs is not None:
            if not isinstance(target_prompt_logprobs, TensorData):
                target_prompt_logprobs = TensorData.model_validate(target_prompt_logprobs, from_attributes=True)
            if target_prompt_logprobs.dtype != "int64" or not target_prompt_logprobs.shape \
                    or len(target_prompt_logprobs.shape) != 2:
                raise ValueError("target_prompt_logprobs must be a 2-D int64 tensor [len(prompt) - 1, K]")
            body["target_prompt_logprobs"] = target_prompt_logprobs.to_json_dict()
        if prompt_logprobs_last_n is not None:
            body["prompt_logprobs_last_n"] = prompt_logprobs_last_n
        return body

    def _rate_limiter(self) -> rate_limit.TenantRateLimiter:
        """The limiter shared by every sampler of this (base URL, API key) in the process."""
        if self._limiter is None:
            self._limiter = rate_limit.limiter_for(self.holder.base_url, self.holder.connection.api_key)
        return self._limiter

    def _semaphore_for_loop(self) -> asyncio.Semaphore:
        if self._semaphore is None:
            limit = min(self._retry_config.max_connections, self.holder.client_config.sample_max_concurrent_requests)
            self._semaphore = asyncio.Semaphore(max(1, limit))
        return self._semaphore

    async def _sample_with_retries(self, body: dict[str, Any], prompt_bytes: int, alt_k: int,
                                   last_n: int | None) -> SampleResponse:
        await self.holder.ensure_ready()
        await self._ensure_clone_id()
        config = self._retry_config
        no_retries = self.holder.client_config.sample_no_retries or not config.enable_retry_logic
        started = time.monotonic()
        attempt = 0
        async with self._semaphore_for_loop():
            while True:
                try:
                    response = await self._sample_once(dict(body), prompt_bytes)
                    break
                except Exception as exc:
                    retryable = isinstance(exc, config.retryable_exceptions) or is_retryable(exc)
                    if no_retries or not retryable:
                        raise
                    if config.enable_stuck_detection and time.monotonic() - started > config.progress_timeout:
                        raise APIConnectionError(getattr(exc, "request", None) or _dummy_request(),
                                                 f"No progress made in {config.progress_timeout:.0f}s") from exc
                    if self.holder.telemetry is not None:
                        self.holder.telemetry.generic("RetryHandler.execute.exception", {
                            "func": "sample", "exception": str(exc), "exception_type": type(exc).__name__,
                            "attempt_count": attempt + 1, "status_code": getattr(exc, "status_code", None)},
                            severity="WARNING")
                    await asyncio.sleep(config.delay(attempt))
                    attempt += 1
        self._check_response(response, alt_k, last_n)
        return response

    async def _sample_once(self, body: dict[str, Any], prompt_bytes: int) -> SampleResponse:
        """Submit one sample (one seq_id; 429 means back off and resubmit) and wait for its result."""
        holder = self.holder
        body["seq_id"] = self._take_seq_id()

        async def post() -> Any:
            try:
                return await holder.transport.request("POST", "/api/v1/asample", purpose="sample", json=body,
                                                      headers={"X-Tinker-Sampling-Backpressure": "1"},
                                                      max_retries=0)
            except APIStatusError as exc:
                if exc.status_code == 429:
                    return exc
                raise

        limiter = self._rate_limiter()
        async with limiter.slot(prompt_bytes):
            while True:
                await limiter.wait_for_backoff()
                started = time.monotonic()
                result = await holder.execute_with_retries(post)
                if isinstance(result, APIStatusError):  # backpressure: every sampler of this tenant waits
                    said = result.body if isinstance(result.body, dict) else {}
                    if said.get("queue_state") or said.get("queue_state_reason"):
                        self.on_queue_state_change(said.get("queue_state") or "active", said.get("queue_state_reason"))
                    limiter.backoff(limiter.backoff_for(result.response, prompt_bytes),
                                    reason=f"{result.status_code} on asample")
                    continue
                break
            return await self._finish_sample(result, started)

    async def _finish_sample(self, result: Any, started: float) -> SampleResponse:
        holder = self.holder
        roundtrip = time.monotonic() - started
        future = validate(result, UntypedAPIFuture)
        response: SampleResponse = await poll_result(holder, future.request_id, "Sample",
                                                     proto_decoder=decode_sample_response, roundtrip_s=roundtrip,
                                                     on_queue_state=self.on_queue_state_change, purpose="sample")
        ids = future.sample_sequence_ids
        if ids is not None:
            if len(ids) != len(response.sequences):
                raise TinkerError(f"the server returned {len(response.sequences)} sequences for "
                                  f"{len(ids)} sample_sequence_ids")
            for sequence, sequence_id in zip(response.sequences, ids):
                sequence.sequence_id = sequence_id
        return response

    @staticmethod
    def _check_response(response: SampleResponse, alt_k: int, last_n: int | None) -> None:
        if alt_k > 0 and response.prompt_alt_tokens is None:
            raise RuntimeError("prompt_alt_tokens_k was requested but the server returned no prompt_alt_tokens")
        if last_n is not None and response.prompt_logprobs is not None:
            cut = max(0, len(response.prompt_logprobs) - last_n)
            for value in response.prompt_logprobs[:cut]:
                if value is not None and not math.isnan(value):
                    raise RuntimeError("the server returned prompt logprobs outside prompt_logprobs_last_n")

    @sdk_method("SamplingClient.compute_logprobs")
    def compute_logprobs(self, prompt: ModelInput, prompt_logprobs_last_n: int | None = None
                         ) -> APIFuture[list[float | None]]:
        """The logprob of each prompt token given the ones before it (the first is None)."""
        body = self._sample_body(prompt, 1, SamplingParams(max_tokens=1), True, 0, 0, None, 0, prompt_logprobs_last_n)

        async def run() -> list[float | None]:
            response = await self._sample_with_retries(body, _prompt_bytes(prompt), 0, prompt_logprobs_last_n)
            if response.prompt_logprobs is None:
                raise TinkerError("the server returned no prompt logprobs")
            return list(response.prompt_logprobs)

        return self.holder.run(run())

    @sdk_method("SamplingClient.compute_logprobs_async")
    async def compute_logprobs_async(self, prompt: ModelInput, prompt_logprobs_last_n: int | None = None
                                     ) -> list[float | None]:
        return await self.compute_logprobs(prompt, prompt_logprobs_last_n)

    # ---- information -------------------------------------------------------------------------

    def get_base_model(self) -> str:
        return self._base_model

    async def get_base_model_async(self) -> str:
        return self._base_model

    def get_tokenizer(self) -> Any:
        return get_tokenizer(self._base_model)

    def get_telemetry(self) -> Any:
        return self.holder.telemetry

    def on_queue_state_change(self, queue_state: str, queue_state_reason: str | None) -> None:
        """Called by the poll loop with each reported queue state; logs once per change (see `queue_state`)."""
        self._queue_tracker(queue_state, queue_state_reason)

    # ---- moving between processes ------------------------------------------------------------

    def _state(self, with_key: bool = True) -> dict[str, Any]:
        config = self.holder.config()
        return {
            "session_id": self.holder.session_id,
            "sampling_session_id": self._sampling_session_id,
            "holder": {"base_url": config.base_url, "default_headers_overrides": config.default_headers_overrides,
                       "client_config": config.client_config, "client_dynamic_config":
                           self.holder.dynamic_config.model_dump(mode="json"),
                       "api_key": config.api_key if with_key else None},
            "base_model": self._base_model,
            "record_stability_info": self._record_stability_info,
        }

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return (_unpickle_sampling_client, (self._state(),))

    def get_sampler_handle(self) -> str:
        """A string from which `SamplingClient.from_sampler_handle` rebuilds this client (no API key in it)."""
        raw = json.dumps(self._state(with_key=False), sort_keys=True).encode()
        return base64.urlsafe_b64encode(raw).decode("ascii")

    @staticmethod
    def from_sampler_handle(handle: str, *, api_key: str | None = None) -> SamplingClient:
        state = json.loads(base64.urlsafe_b64decode(handle.encode("ascii")))
        if api_key is None:
            from ._config import embedded_key_for, find_credential
            api_key = find_credential() or embedded_key_for(state["holder"]["base_url"])
        if api_key is None:
            raise TinkerError("from_sampler_handle needs an API key (api_key= or TINKER_API_KEY)")
        state["holder"]["api_key"] = api_key
        return _unpickle_sampling_client(state)

    def __repr__(self) -> str:
        return f"SamplingClient(sampling_session_id={self._sampling_session_id!r}, base_model={self._base_model!r})"


def _unpickle_sampling_client(state: dict[str, Any]) -> SamplingClient:
    holder_state = state["holder"]
    config = HolderConfig(base_url=holder_state["base_url"], api_key=holder_state["api_key"],
                          default_headers_overrides=dict(holder_state.get("default_headers_overrides") or {}),
                          client_config=holder_state.get("client_config"))
    holder = shadow_holder(state["session_id"], config)
    return SamplingClient(holder, sampling_session_id=state["sampling_session_id"], base_model=state["base_model"],
                          shadow=True, record_stability_info=state.get("record_stability_info", False))


def _dummy_request() -> httpx.Request:
    return httpx.Request("POST", "http://tinkex.invalid/api/v1/asample")


class BackcompatSamplingClientFuture(AwaitableConcurrentFuture[SamplingClient]):
    """An APIFuture[SamplingClient] that also answers SamplingClient's methods (waiting for it first)."""

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return self.result().__reduce__()


def _forwarder(name: str, is_async: bool) -> Any:
    if is_async:
        async def forward_async(self: BackcompatSamplingClientFuture, *args: Any, **kwargs: Any) -> Any:
            client = await self.result_async()
            return await getattr(client, name)(*args, **kwargs)
        forward_async.__name__ = name
        return forward_async

    def forward(self: BackcompatSamplingClientFuture, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.result(), name)(*args, **kwargs)
    forward.__name__ = name
    return forward


for _name, _value in list(vars(SamplingClient).items()):
    if not _name.startswith("_") and callable(_value) and not isinstance(_value, staticmethod):
        setattr(BackcompatSamplingClientFuture, _name,
                _forwarder(_name, asyncio.iscoroutinefunction(getattr(_value, "__wrapped__", _value))))
