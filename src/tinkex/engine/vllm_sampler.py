"""Sampling on GPUs with vLLM: the engine's continuous sampling interface over vLLM's `LLMEngine`.

Chosen with `Engine(..., sampler_backend="vllm")` (`tinkex serve --sampler-backend vllm`). The torch
engine keeps everything else -- training, checkpoints, the checks of every request -- and hands this
backend the sample requests it can serve:

- the bare base model, and sampler checkpoints (`Engine.load_sampler_weights`: the peft-format
  directories of save_weights_for_sampler and save_weights_and_get_sampling_client). Each is
  registered with vLLM as a `LoRARequest` under an integer id that is never reused in this process
  (vLLM caches adapters by that id, so a reused id could serve another adapter's stale weights);
- not *live* samplers (`kind="inflight"`): they follow a training adapter whose weights change with
  every optim_step, which vLLM cannot see without a save, so the torch sampler answers them, as it
  does any request for an adapter not registered here. (`Engine.sample`, the run-to-completion call
  the server does not use, stays on the torch sampler too.)

Results are the torch sampler's, field for field: logprobs of the unmodified distribution (vLLM's
`logprobs_mode="raw_logprobs"`, always set: log_softmax of the raw logits, before temperature and
top-k/top-p), prompt logprobs with NaN at position 0 and where not asked, top-k tables padded with
Tinker's sentinel, stop reason "stop" whenever the sample ended on a stop token or stop string (vLLM
checks the length limit first and says "length" for a stop token drawn as the last allowed token).
Greedy tokens are the torch sampler's up to float rounding; seeded random draws repeat within vLLM
but are not the torch sampler's draws (another generator).

Not served here (EngineError): `target_prompt_tokens`, and more top-k logprobs than the engine arg
`max_logprobs`.

Targets vLLM 0.10.2 to 0.20 (the V1 engine: `LLMEngine.from_engine_args`, `add_request`, `step`,
`abort_request`, `add_lora`, `remove_lora`; the `logprobs_mode` it sets is in 0.10.2 and later). `vllm` is imported
in this module only, when the backend is chosen: `pip install 'tinkex[vllm]'` on a machine with an
NVIDIA GPU (its wheels bring their own CUDA build of torch).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import sampler
from .api import EngineError, SampledSeq, SampleJob, SampleResult
from .models import BaseModel

INSTALL_HINT = "pip install 'tinkex[vllm]'"
# Defaults for vLLM's EngineArgs; `vllm_engine_args` overrides them.
DEFAULT_ENGINE_ARGS: dict[str, object] = {
    "gpu_memory_utilization": 0.45,  # the torch engine shares the GPU (training, live samplers)
    "max_lora_rank": 64,  # the largest adapter rank served (vLLM allows up to 512)
    "max_loras": 8,  # adapters in one batch on the GPU; vLLM keeps more in its CPU cache
    "max_logprobs": 64,  # the most top-k logprobs a request may ask for (-1: no cap)
}
# Set whatever the caller passes: the mapping of results relies on them.
REQUIRED_ENGINE_ARGS: dict[str, object] = {"enable_lora": True, "logprobs_mode": "raw_logprobs"}


class VllmUnavailable(RuntimeError):
    """vllm cannot be imported here: the vLLM sampler backend cannot start."""


def load_vllm() -> SimpleNamespace:
    """The parts of vllm this module uses; VllmUnavailable (naming the extra) when it is missing."""
    try:
        from vllm import EngineArgs, LLMEngine, SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind
    except ImportError as exc:
        raise VllmUnavailable(
            f"the vLLM sampler backend needs vllm, which cannot be imported here ({exc}). Install it on a "
            f"machine with an NVIDIA GPU: {INSTALL_HINT} -- or use the torch sampler (--sampler-backend torch)"
        ) from exc
    return SimpleNamespace(EngineArgs=EngineArgs, LLMEngine=LLMEngine, SamplingParams=SamplingParams,
                           LoRARequest=LoRARequest, RequestOutputKind=RequestOutputKind)


@dataclass
class _Running:
    """One sample request inside vLLM."""

    job: SampleJob
    prepared: sampler.PreparedSample  # the torch sampler's view of the job: stop ids, first prompt logprob
    engine: object  # the LLMEngine running it
    runs: int  # vLLM samples asked for: 1 for greedy, whose samples are all the same
    completions: dict[int, object] = field(default_factory=dict)  # index -> latest (cumulative) CompletionOutput
    prompt_logprobs: list | None = None
    streamed: dict[int, int] = field(default_factory=dict)  # index -> tokens already passed to on_tokens

    def samples_of(self, index: int) -> Iterable[int]:
        return range(self.job.num_samples) if self.runs == 1 else (index,)

    def absorb(self, output) -> None:
        """Take in one RequestOutput. Every output is cumulative (CUMULATIVE or FINAL_ONLY); with n > 1,
        vLLM's V1 engine streams each sample in its own output, so keep the latest one per index."""
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        for completion in output.outputs:
            self.completions[completion.index] = completion
            if self.job.on_tokens is None or self.job.max_tokens == 0:
                continue
            tokens = [int(t) for t in completion.token_ids]
            seen = self.streamed.get(completion.index, 0)
            for length in range(seen + 1, len(tokens) + 1):  # token by token, as the torch sampler streams
                for s in self.samples_of(completion.index):
                    self.job.on_tokens(s, tokens[:length])
            self.streamed[completion.index] = max(seen, len(tokens))

    def result(self) -> SampleResult:
        missing = [i for i in range(self.runs) if i not in self.completions]
        if missing:
            raise RuntimeError(f"vLLM finished the request without sample {missing[0]}")
        aborted = [c for c in self.completions.values() if c.finish_reason not in ("stop", "length")]
        if aborted:
            raise RuntimeError(f"vLLM ended a sample with finish_reason {aborted[0].finish_reason!r}")
        result = _prompt_result(self.job, self.prepared.first_prompt_logprob, self.prompt_logprobs)
        result.sequences = [self._sequence(self.completions[0 if self.runs == 1 else s])
                            for s in range(self.job.num_samples)]
        return result

    def _sequence(self, completion) -> SampledSeq:
        k = self.job.topk_sample_logprobs
        if self.job.max_tokens == 0:  # vLLM decoded one token only because it cannot decode none
            seq = SampledSeq(np.zeros(0, np.int32), np.zeros(0, np.float32), "length")
            if k:
                seq.topk_token_ids, seq.topk_logprobs = np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
            return seq
        tokens = [int(t) for t in completion.token_ids]
        steps = completion.logprobs
        if steps is None or len(steps) != len(tokens):
            raise RuntimeError("vLLM returned no logprob for some sampled tokens")
        stopped = completion.finish_reason == "stop" or (bool(tokens) and tokens[-1] in self.prepared.stop_ids)
        seq = SampledSeq(tokens=np.array(tokens, np.int32),
                         logprobs=np.array([step[t].logprob for step, t in zip(steps, tokens)], np.float32),
                         stop_reason="stop" if stopped else "length")
        if k:
            tables = [_top(step, k) for step in steps]
            seq.topk_token_ids = np.array([ids for ids, _ in tables], np.int32).reshape(len(tokens), k)
            seq.topk_logprobs = np.array([values for _, values in tables], np.float32).reshape(len(tokens), k)
        return seq


class VllmSampler:
    """The sampling side of the Engine on vLLM: one LLMEngine per base model, made on first use.

    `base_of(name)` gives the torch engine's BaseModel (its directory, vocabulary, EOS ids) or raises
    EngineError; `vllm` is load_vllm()'s namespace (a test passes a stand-in with the same API)."""

    def __init__(self, base_of: Callable[[str], BaseModel], engine_args: Mapping[str, object] | None = None, *,
                 vllm: SimpleNamespace | None = None):
        self._vllm = vllm if vllm is not None else load_vllm()
        self._base_of = base_of
        self.engine_args = {**DEFAULT_ENGINE_ARGS, **(engine_args or {}), **REQUIRED_ENGINE_ARGS}
        self.engine_args.pop("model", None)  # always the served base model's directory
        self._engines: dict[str, object] = {}  # base model name -> LLMEngine
        self._loras: dict[str, tuple[str, object]] = {}  # adapter id -> (base model name, LoRARequest)
        self._lora_ids = itertools.count(1)  # vLLM's adapter ids start at 1; never reused
        self._request_ids = itertools.count()
        self._running: dict[str, _Running] = {}  # vLLM request id -> request
        self._cancelled: list[tuple[SampleJob, Exception]] = []

    # --- adapters ---------------------------------------------------------------------------

    def serves(self, job: SampleJob) -> bool:
        """Whether this backend takes the request: the bare base model, or an adapter registered here."""
        return job.adapter_id is None or job.adapter_id in self._loras

    def lora_request(self, adapter_id: str):
        return self._loras[adapter_id][1]

    def add_adapter(self, adapter_id: str, directory: Path, base_model: str, rank: int) -> None:
        """Register a sampler checkpoint directory (a peft adapter) and load it into vLLM now, so that
        an adapter vLLM cannot serve fails here, with an EngineError, and not in a running batch."""
        if adapter_id in self._loras:
            raise EngineError(f"adapter {adapter_id!r} is already registered with the vLLM sampler")
        max_rank = int(self.engine_args["max_lora_rank"])
        if rank > max_rank:
            raise EngineError(f"adapter {adapter_id!r} has LoRA rank {rank}, above the vLLM sampler's max_lora_rank "
                              f"of {max_rank} (raise it with the vLLM engine arg max_lora_rank, at most 512)")
        engine = self._engine(base_model)
        request = self._vllm.LoRARequest(lora_name=adapter_id, lora_int_id=next(self._lora_ids),
                                         lora_path=str(directory))
        try:
            engine.add_lora(request)
        except Exception as exc:  # vLLM's loader raises ValueError and others for adapters it cannot serve
            raise EngineError(f"vLLM cannot load the adapter in {directory}: {exc}") from exc
        self._loras[adapter_id] = (base_model, request)

    def remove_adapter(self, adapter_id: str) -> None:
        """Forget an adapter: its running requests fail (step_samples reports them), vLLM unloads it."""
        entry = self._loras.pop(adapter_id, None)
        if entry is None:
            return
        base_model, request = entry
        engine = self._engines[base_model]
        gone = [rid for rid, running in self._running.items() if running.job.adapter_id == adapter_id]
        if gone:
            engine.abort_request(gone)
        for rid in gone:
            self._cancelled.append((self._running.pop(rid).job, EngineError(
                f"adapter {adapter_id!r} was removed while this request was sampling from it")))
        engine.remove_lora(request.lora_int_id)

    # --- sampling ---------------------------------------------------------------------------

    def submit_samples(self, jobs: list[SampleJob]) -> list[tuple[SampleJob, EngineError]]:
        """Hand requests to vLLM; they start at the next step_samples(). Returns those refused, with why."""
        refused = []
        for job in jobs:
            try:
                self._submit(job)
            except EngineError as exc:
                refused.append((job, exc))
        return refused

    def step_samples(self) -> list[tuple[SampleJob, SampleResult | Exception]]:
        """One step of every LLMEngine with requests; returns the requests that finished or failed."""
        done, self._cancelled = self._cancelled, []
        for engine in self._engines.values():
            mine = [rid for rid, running in self._running.items() if running.engine is engine]
            if not mine:
                continue
            try:
                if not engine.has_unfinished_requests():  # step() would wait for outputs that never come
                    raise RuntimeError("vLLM lost track of requests it was running")
                outputs = engine.step()
            except Exception as exc:  # a fault, not bad input: fail this engine's requests, keep serving
                _abort(engine, mine)
                done += [(self._running.pop(rid).job, exc) for rid in mine]
                continue
            for output in outputs:
                running = self._running.get(output.request_id)
                if running is None:  # aborted since
                    continue
                try:
                    running.absorb(output)
                    if output.finished:
                        del self._running[output.request_id]
                        done.append((running.job, running.result()))
                except Exception as exc:  # a streaming listener's error, or an output we cannot map
                    self._running.pop(output.request_id, None)
                    _abort(engine, [output.request_id])
                    done.append((running.job, exc))
        return done

    @property
    def sampling(self) -> bool:
        """Whether requests are running (step_samples has work)."""
        return bool(self._running) or bool(self._cancelled)

    def sample(self, jobs: list[SampleJob]) -> list[SampleResult | Exception]:
        """Run these requests to completion (with whatever else is running); results in order."""
        results: list[SampleResult | Exception | None] = [None] * len(jobs)
        where = {id(job): i for i, job in enumerate(jobs)}
        for job, exc in self.submit_samples(jobs):
            results[where[id(job)]] = exc
        while any(result is None for result in results) and self.sampling:
            for job, result in self.step_samples():
                if id(job) in where:
                    results[where[id(job)]] = result
        return results

    def _submit(self, job: SampleJob) -> None:
        base = self._base_of(job.base_model)
        lora = None
        if job.adapter_id is not None:
            if job.adapter_id not in self._loras:
                raise EngineError(f"adapter {job.adapter_id!r} is not loaded in the vLLM sampler")
            adapter_base, lora = self._loras[job.adapter_id]
            if adapter_base != base.name:
                raise EngineError(f"adapter {job.adapter_id!r} belongs to base model {adapter_base!r}, "
                                  f"not {job.base_model!r}")
        prepared = sampler.prepare(0, job, base)  # the torch sampler's checks, with the same messages
        if prepared.targets is not None:
            raise EngineError("target_prompt_tokens is not served by the vLLM sampler backend; use a server with "
                              "the torch sampler (tinkex serve --sampler-backend torch)")
        cap = int(self.engine_args["max_logprobs"])
        for name in ("topk_prompt_logprobs", "topk_sample_logprobs"):
            if cap >= 0 and getattr(job, name) > cap:
                raise EngineError(f"{name}={getattr(job, name)} exceeds the vLLM sampler's max_logprobs of {cap} "
                                  "(the vLLM engine arg max_logprobs)")
        engine = self._engine(base.name)
        request_id = f"tinkex-{next(self._request_ids)}"
        params = self._params(job, prepared, base)
        try:
            engine.add_request(request_id, {"prompt_token_ids": [int(t) for t in job.prompt]}, params,
                               lora_request=lora)
        except ValueError as exc:  # vLLM's own checks of a request (e.g. longer than its max_model_len)
            raise EngineError(f"vLLM refused the request: {exc}") from exc
        self._running[request_id] = _Running(job, prepared, engine, runs=params.n)

    def _params(self, job: SampleJob, prepared: sampler.PreparedSample, base: BaseModel):
        """The SampleJob as vLLM's SamplingParams."""
        kind = self._vllm.RequestOutputKind
        prompt_k = job.topk_prompt_logprobs
        return self._vllm.SamplingParams(
            n=1 if job.temperature == 0 else job.num_samples,  # greedy samples are all the same: decode one
            max_tokens=max(job.max_tokens, 1),  # vLLM decodes at least one token; 0 asks only for prompt logprobs
            temperature=float(job.temperature),
            top_p=float(job.top_p),
            top_k=job.top_k if 0 < job.top_k < base.info.vocab_size else -1,  # -1: no limit, in every version
            seed=None if job.seed is None else int(job.seed) % (1 << 63),
            stop=list(job.stop_strings) or None,
            stop_token_ids=sorted(prepared.stop_ids),  # EOS ids (tokenizer's and generation config's) when None
            ignore_eos=job.stop_token_ids is not None,  # explicit stop ids replace EOS, as in the torch sampler
            logprobs=job.topk_sample_logprobs,  # 0: the drawn token's logprob only
            prompt_logprobs=prompt_k if job.prompt_logprobs or prompt_k else None,
            detokenize=bool(job.stop_strings),  # text is needed only to find stop strings
            skip_special_tokens=False,  # stop strings see special tokens' text, as the torch sampler's decode does
            output_kind=kind.CUMULATIVE if job.on_tokens is not None else kind.FINAL_ONLY,
        )

    def _engine(self, base_model: str):
        engine = self._engines.get(base_model)
        if engine is None:
            base = self._base_of(base_model)
            args = self._vllm.EngineArgs(model=str(base.directory), **self.engine_args)
            engine = self._engines[base_model] = self._vllm.LLMEngine.from_engine_args(args)
        return engine


def _abort(engine, request_ids: list[str]) -> None:
    try:
        engine.abort_request(request_ids)
    except Exception:  # the engine is already broken; its requests are being failed anyway
        pass


def _top(entries: Mapping[int, object], k: int) -> tuple[list[int], list[float]]:
    """The k best of one position's {token: Logprob} (the top-k entries carry ranks 1..k; the drawn or
    prompt token is there too, with its own rank), padded with Tinker's sentinel cell."""
    best = sorted((lp.rank, -lp.logprob, token) for token, lp in entries.items()
                  if lp.rank is not None and lp.rank <= k)[:k]
    pad = k - len(best)
    return ([token for _, _, token in best] + [sampler.TOPK_SENTINEL[0]] * pad,
            [-negative for _, negative, _ in best] + [sampler.TOPK_SENTINEL[1]] * pad)


def _prompt_result(job: SampleJob, first: int, prompt_logprobs: list | None) -> SampleResult:
    """Prompt logprobs and top-k tables from vLLM's per-position {token: Logprob} (None at position 0),
    from position `first` on, as the torch sampler lays them out."""
    result = SampleResult(sequences=[])
    k = job.topk_prompt_logprobs
    if not (job.prompt_logprobs or k):
        return result
    n = len(job.prompt)
    if prompt_logprobs is None or len(prompt_logprobs) != n:
        raise RuntimeError("vLLM returned no prompt logprobs for a request that asked for them")
    positions = range(first, n)
    if job.prompt_logprobs:
        values = np.full(n, np.nan, np.float32)
        for p in positions:
            values[p] = prompt_logprobs[p][int(job.prompt[p])].logprob
        result.prompt_logprobs = values
    if k:
        ids = np.full((n, k), sampler.TOPK_SENTINEL[0], np.int32)
        values = np.full((n, k), sampler.TOPK_SENTINEL[1], np.float32)
        for p in positions:
            ids[p], values[p] = _top(prompt_logprobs[p], k)
        result.topk_prompt_token_ids, result.topk_prompt_logprobs = ids, values
    return result
