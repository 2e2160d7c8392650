"""An OpenAI-compatible endpoint over the same sampler: /v1/models, /v1/completions, /v1/chat/completions.

`model` is a base model name or a tinker:// checkpoint path (sampler or training weights). Auth is
the tinkex API key, which OpenAI clients send as `Authorization: Bearer <key>`. Sampling goes
through the scheduler like `asample`, so it batches with everyone else's requests.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from tinkex.types import ModelInput, SampleRequest, SampleResponse, SamplingParams

from .. import convert
from ..deps import RuntimeDep, TenantDep
from ..runtime import Runtime, bad_request
from ..store import CheckpointRow, TrainingRunRow
from .sampling import queue_sample

router = APIRouter(prefix="/v1", tags=["openai"])


class ChatMessage(BaseModel):
    role: str
    content: str


class _Common(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=convert.MAX_SAMPLES)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    logprobs: Any = None


class CompletionRequest(_Common):
    prompt: str | list[int]


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)


def _target(runtime: Runtime, model: str, tenant: str) -> tuple[str, str | None]:
    """(base model, engine adapter) for a model name or a checkpoint path."""
    if model.startswith("tinker://"):
        checkpoint: CheckpointRow = runtime.checkpoint(model, tenant)
        run = runtime.store.get(TrainingRunRow, checkpoint.training_run_id)
        return run.base_model, runtime.register_sampler_weights(checkpoint.directory)
    return runtime.model_info(model).name, None


def _submit(runtime: Runtime, tenant: str, body: _Common, prompt: list[int], max_tokens: int | None,
            on_tokens=None):
    """Check the request and queue it (errors raise here, before any response starts)."""
    base_model, adapter = _target(runtime, body.model, tenant)
    info = runtime.model_info(base_model)
    request = SampleRequest(prompt=ModelInput.from_ints(prompt), num_samples=body.n, sampling_params=SamplingParams(
        max_tokens=16 if max_tokens is None else max_tokens, temperature=body.temperature, top_p=body.top_p,
        seed=body.seed, stop=body.stop))
    try:
        job = convert.sample_job(request, info, adapter)
    except convert.InputError as exc:
        raise bad_request(str(exc)) from None
    job.on_tokens = on_tokens
    return queue_sample(runtime, tenant, job, request)


async def _result(runtime: Runtime, future) -> SampleResponse:
    while not await runtime.futures.wait(future, 60):
        pass
    if future.outcome.error is not None:
        raise HTTPException(status_code=400 if future.outcome.category == "user" else 500,
                            detail=future.outcome.error)
    return future.outcome.result


def _finish_reason(stop_reason: str) -> Literal["stop", "length"]:
    return "stop" if stop_reason == "stop" else "length"


def _text(runtime: Runtime, base_model: str, tokens: list[int]) -> str:
    return runtime.engine.tokenizer(base_model).decode(tokens, skip_special_tokens=True)


def _usage(prompt: list[int], response: SampleResponse) -> dict:
    completion = sum(len(s.tokens) for s in response.sequences)
    return {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}


@router.get("/models")
def list_models(runtime: RuntimeDep, tenant: TenantDep) -> dict:
    models = [{"id": info.name, "object": "model", "created": 0, "owned_by": "tinkex"}
              for info in runtime.engine.model_infos()]
    checkpoints, _ = runtime.store.list(CheckpointRow, tenant, order_by=CheckpointRow.created_at.desc(),
                                        limit=100, checkpoint_type="sampler")
    models += [{"id": c.tinker_path, "object": "model", "created": int(c.created_at.timestamp()),
                "owned_by": tenant} for c in checkpoints]
    return {"object": "list", "data": models}


@router.post("/completions")
async def completions(body: CompletionRequest, runtime: RuntimeDep, tenant: TenantDep):
    base_model, _ = _target(runtime, body.model, tenant)
    prompt = body.prompt if isinstance(body.prompt, list) else runtime.engine.tokenizer(base_model).encode(body.prompt)
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return _stream(runtime, tenant, body, prompt, body.max_tokens, base_model, ident, created, chat=False)
    response = await _result(runtime, _submit(runtime, tenant, body, prompt, body.max_tokens))
    return {"id": ident, "object": "text_completion", "created": created, "model": body.model,
            "choices": [{"index": i, "text": _text(runtime, base_model, s.tokens), "logprobs": None,
                         "finish_reason": _finish_reason(s.stop_reason)} for i, s in enumerate(response.sequences)],
            "usage": _usage(prompt, response)}


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, runtime: RuntimeDep, tenant: TenantDep):
    base_model, _ = _target(runtime, body.model, tenant)
    tokenizer = runtime.engine.tokenizer(base_model)
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request(f"{base_model} has no chat template; use /v1/completions")
    prompt = list(tokenizer.apply_chat_template([m.model_dump() for m in body.messages], add_generation_prompt=True,
                                                tokenize=True, return_dict=False))
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return _stream(runtime, tenant, body, prompt, max_tokens, base_model, ident, created, chat=True)
    response = await _result(runtime, _submit(runtime, tenant, body, prompt, max_tokens))
    return {"id": ident, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": _text(runtime, base_model, s.tokens)},
                         "finish_reason": _finish_reason(s.stop_reason)} for i, s in enumerate(response.sequences)],
            "usage": _usage(prompt, response)}


def _stream(runtime: Runtime, tenant: str, body: _Common, prompt: list[int], max_tokens: int | None,
            base_model: str, ident: str, created: int, *, chat: bool) -> StreamingResponse:
    """Server-sent events: a chunk per decoded piece of text as the sampler produces tokens."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()

    def on_tokens(sequence: int, tokens: list[int]) -> None:  # called on the engine thread
        loop.call_soon_threadsafe(updates.put_nowait, (sequence, list(tokens)))

    future = _submit(runtime, tenant, body, prompt, max_tokens, on_tokens)

    def chunk(index: int, text: str, finish: str | None) -> str:
        if chat:
            delta = {"content": text} if text else {}
            choice = {"index": index, "delta": delta, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        return "data: " + json.dumps({"id": ident, "object": kind, "created": created, "model": body.model,
                                      "choices": [choice]}) + "\n\n"

    async def events():
        sent = [""] * body.n
        task = asyncio.ensure_future(_result(runtime, future))
        if chat:
            for i in range(body.n):
                yield "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created,
                                             "model": body.model, "choices": [{"index": i, "delta": {
                                                 "role": "assistant", "content": ""}, "finish_reason": None}]}) + "\n\n"
        while not task.done() or not updates.empty():
            getter = asyncio.ensure_future(updates.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                continue
            index, tokens = getter.result()
            text = _text(runtime, base_model, tokens)
            if text.startswith(sent[index]) and len(text) > len(sent[index]) and not text.endswith("\ufffd"):
                yield chunk(index, text[len(sent[index]):], None)
                sent[index] = text
        response = task.result()
        for index, sequence in enumerate(response.sequences):
            text = _text(runtime, base_model, sequence.tokens)
            yield chunk(index, text[len(sent[index]):] if text.startswith(sent[index]) else "",
                        _finish_reason(sequence.stop_reason))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
