"""The vLLM sampler backend's glue (tinkex.engine.vllm_sampler), on a machine without vLLM or a GPU.

vLLM itself cannot run here, so the glue is driven through `FakeVllm`: a stand-in with vLLM's API as
the glue uses it (EngineArgs, LLMEngine.from_engine_args / add_request / step / abort_request /
add_lora / remove_lora, SamplingParams with its checks, RequestOutputKind, LoRARequest,
RequestOutput / CompletionOutput / Logprob) and vLLM V1's behaviour where the glue depends on it:
the length limit checked before stop tokens, EOS unless ignore_eos, {token: Logprob} dicts holding
the drawn (or prompt) token plus the top-k with their ranks, None for prompt position 0, one output
per sample when streaming n > 1, FINAL_ONLY outputs only at the end. Its numbers are real: a plain
transformers model with the adapter directory loaded by peft (as vLLM loads a LoRARequest's path),
recomputed in full at every token. So "the same SampleResult as the torch sampler" below compares two
independent computations of the same model, through the glue.

What needs vLLM for real -- its kernels, LoRA loader and GPU -- is bench/vllm_check.py's job.
"""

from __future__ import annotations

import enum
import math
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tinkex.engine import AdamHyper, Engine, EngineError, ForwardBackwardJob, LoraSpec, SampleJob
from tinkex.engine.sampler import TOPK_SENTINEL
from tinkex.engine.vllm_sampler import INSTALL_HINT, VllmSampler, VllmUnavailable, load_vllm

from .conftest import M, datum, full_logprobs

PROMPT = [1, 388, 201, 761, 278, 223, 19, 20, 13, 25, 33, 2, 201, 1, 420, 201]


# --- the stand-in for vLLM --------------------------------------------------------------------


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""


@dataclass(kw_only=True)
class SamplingParams:
    """vLLM's field names and defaults (those the glue may set), and its argument checks."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.temperature < 0:
            raise ValueError("temperature must be non-negative")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1 (disable) or at least 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are only supported when detokenize is True")


class EngineArgs:
    KNOWN = {"model", "enable_lora", "logprobs_mode", "gpu_memory_utilization", "max_lora_rank", "max_loras",
             "max_logprobs", "dtype", "enforce_eager", "seed"}

    def __init__(self, **kwargs):
        unknown = set(kwargs) - self.KNOWN
        if unknown:
            raise TypeError(f"EngineArgs got unexpected arguments {sorted(unknown)}")
        self.__dict__.update({"max_logprobs": 20, "logprobs_mode": "raw_logprobs", "max_lora_rank": 16,
                              "enable_lora": False, **kwargs})


@dataclass
class _Child:
    """One sample of a request, as vLLM V1 runs n > 1: a child request per sample."""

    index: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    lora: LoRARequest | None
    children: list[_Child]
    prompt_logprobs: list | None = None
    started: bool = False


class FakeLLMEngine:
    instances: list[FakeLLMEngine] = []

    def __init__(self, args: EngineArgs):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        assert args.logprobs_mode == "raw_logprobs", "this stand-in computes raw logprobs only"
        self.args = args
        self.base = AutoModelForCausalLM.from_pretrained(args.model).float().eval()
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        generation = getattr(GenerationConfig.from_model_config(self.base.config), "eos_token_id", None)
        self.generation_eos = {generation} if isinstance(generation, int) else set(generation or ())
        self.models: dict[int, torch.nn.Module] = {}  # lora_int_id -> base + that adapter
        self.requests: dict[str, _Request] = {}
        self.added: list[tuple[str, SamplingParams, LoRARequest | None]] = []  # every add_request, for tests
        self.removed_loras: list[int] = []
        FakeLLMEngine.instances.append(self)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> FakeLLMEngine:
        return cls(args)

    # LoRA: like vLLM, load the peft directory the request names (eagerly on add_lora, else on first use).
    def add_lora(self, lora: LoRARequest) -> bool:
        import json
        from pathlib import Path

        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if not self.args.enable_lora:
            raise ValueError("LoRA is not enabled")
        rank = json.loads((Path(lora.lora_path) / "adapter_config.json").read_text())["r"]
        if rank > self.args.max_lora_rank:
            raise ValueError(f"LoRA rank {rank} is greater than max_lora_rank {self.args.max_lora_rank}.")
        if lora.lora_int_id not in self.models:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peft notes that lm_head is tied to the embedding
                base = AutoModelForCausalLM.from_pretrained(self.args.model).float()
                self.models[lora.lora_int_id] = PeftModel.from_pretrained(base, lora.lora_path).eval()
        return True

    def remove_lora(self, lora_id: int) -> bool:
        self.removed_loras.append(lora_id)
        return self.models.pop(lora_id, None) is not None

    def add_request(self, request_id, prompt, params, arrival_time=None, lora_request=None, trace_headers=None,
                    priority=0) -> None:
        ids = prompt["prompt_token_ids"]
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(params, name)
            if asked is not None and asked > self.args.max_logprobs >= 0:
                raise ValueError(f"Requested {name} of {asked}, which is greater than max allowed: "
                                 f"{self.args.max_logprobs}")
        if lora_request is not None:
            self.add_lora(lora_request)
        children = [_Child(i, None if params.seed is None else torch.Generator().manual_seed(params.seed + i))
                    for i in range(params.n)]
        self.requests[request_id] = _Request(request_id, list(ids), params, lora_request, children)
        self.added.append((request_id, params, lora_request))

    def abort_request(self, request_ids) -> None:
        for rid in request_ids:
            self.requests.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        outputs = []
        for request in list(self.requests.values()):
            model = self.models[request.lora.lora_int_id] if request.lora else self.base
            if not request.started:  # prefill: prompt logprobs from the whole prompt
                request.started = True
                if request.params.prompt_logprobs is not None:
                    logits = model(input_ids=torch.tensor([request.prompt])).logits[0].float()
                    request.prompt_logprobs = [None] + [
                        _logprob_dict(logits[p - 1].log_softmax(-1), request.prompt[p], request.params.prompt_logprobs)
                        for p in range(1, len(request.prompt))]
            streamed = []
            for child in request.children:
                if child.finish_reason is not None:
                    continue
                logits = model(input_ids=torch.tensor([request.prompt + child.tokens])).logits[0, -1].float()
                token = _draw(logits, request.params, child.generator)
                child.tokens.append(token)
                child.logprobs.append(_logprob_dict(logits.log_softmax(-1), token, request.params.logprobs or 0))
                self._check_stop(request.params, child)
                streamed.append(child)
            finished = all(child.finish_reason is not None for child in request.children)
            if finished:
                del self.requests[request.request_id]
            kind = request.params.output_kind
            if kind is RequestOutputKind.FINAL_ONLY:
                if finished:
                    outputs.append(self._output(request, request.children, True))
            elif request.params.n == 1:
                outputs.append(self._output(request, streamed, finished))
            else:  # V1 streams each child of an n > 1 request in its own output
                for i, child in enumerate(streamed):
                    outputs.append(self._output(request, [child], finished and i == len(streamed) - 1))
        return outputs

    def _check_stop(self, params: SamplingParams, child: _Child) -> None:
        """vLLM V1's order: the length limit first, then EOS, then stop token ids; stop strings last
        (they turn a length-capped finish into a stop)."""
        token = child.tokens[-1]
        eos = {self.tokenizer.eos_token_id} | self.generation_eos
        if len(child.tokens) >= params.max_tokens:
            child.finish_reason = "length"
        elif not params.ignore_eos and token in eos:
            child.finish_reason = "stop"
        elif token in (params.stop_token_ids or ()):
            child.finish_reason, child.stop_reason = "stop", token
        if params.stop and params.detokenize and child.finish_reason != "stop":
            text = self.tokenizer.decode(child.tokens, skip_special_tokens=params.skip_special_tokens)
            hit = next((s for s in params.stop if s in text), None)
            if hit is not None:
                child.finish_reason, child.stop_reason = "stop", hit

    def _output(self, request: _Request, children: list[_Child], finished: bool) -> RequestOutput:
        completions = [CompletionOutput(c.index, "", list(c.tokens), None, list(c.logprobs), c.finish_reason,
                                        c.stop_reason) for c in children]
        return RequestOutput(request.request_id, None, request.prompt, request.prompt_logprobs, completions, finished)


def _logprob_dict(logprobs: torch.Tensor, token: int, k: int) -> dict[int, Logprob]:
    """vLLM's layout: the chosen token first (its rank: how many tokens are at least as likely), then
    the top k with ranks 1..k (a token in both keeps its place and gets the top-k entry)."""
    value = logprobs[token].item()
    entries = {token: Logprob(value, int((logprobs >= value).sum()))}
    if k:
        top = logprobs.topk(k)
        for rank, (tid, lp) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
            entries[tid] = Logprob(lp, rank)
    return entries


def _draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.temperature < 1e-5:
        return int(logits.argmax())
    scores = logits / params.temperature
    if params.top_k > 0:
        kth = scores.topk(params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p < 1:
        ordered, order = scores.sort(descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p
        scores = scores.scatter(0, order, ordered.masked_fill(drop, -math.inf))
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


FAKE_VLLM = SimpleNamespace(EngineArgs=EngineArgs, LLMEngine=FakeLLMEngine, SamplingParams=SamplingParams,
                            LoRARequest=LoRARequest, RequestOutputKind=RequestOutputKind)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(engine, tmp_path_factory):
    """A training adapter taught to answer "cat says" with " meow<|im_end|>", and its sampler checkpoint."""
    tok = engine.tokenizer(M)
    tokens = tok.encode("cat says meow") + [tok.convert_tokens_to_ids("<|im_end|>")]
    aid = "vllm-trained"
    engine.create_adapter(aid, M, LoraSpec(rank=8, seed=3))
    job = ForwardBackwardJob(aid, [datum(tokens[:-1], tokens[1:])], "cross_entropy")
    for _ in range(40):
        engine.forward_backward([job])
        engine.optim_step(aid, AdamHyper(learning_rate=5e-3))
    directory = tmp_path_factory.mktemp("vllm") / "sampler"
    engine.save_sampler_weights(aid, directory)
    yield SimpleNamespace(id=aid, directory=directory, prompt=tok.encode("cat says"), tokenizer=tok)
    engine.remove_adapter(aid)


@pytest.fixture(scope="module")
def ckpt(engine, trained):
    """The trained checkpoint loaded in the torch engine as "ckpt", for the torch sampler's answers."""
    engine.load_sampler_weights("ckpt", trained.directory)
    yield "ckpt"
    engine.remove_adapter("ckpt")


@pytest.fixture
def vllm(engine, trained, ckpt):
    """A VllmSampler over the stand-in, with the trained checkpoint registered under the same id."""
    sampler = VllmSampler(engine._base, {"max_logprobs": 20}, vllm=FAKE_VLLM)
    sampler.add_adapter(ckpt, trained.directory, M, rank=8)
    return sampler


def _fake(sampler: VllmSampler) -> FakeLLMEngine:
    return sampler._engine(M)


def _job(**kwargs) -> SampleJob:
    return SampleJob(**{"base_model": M, "adapter_id": "ckpt", "prompt": PROMPT, **kwargs})


def _both(engine, vllm, **kwargs):
    (torch_result,) = engine.sample([_job(**kwargs)])
    (vllm_result,) = vllm.sample([_job(**kwargs)])
    assert not isinstance(torch_result, Exception), torch_result
    assert not isinstance(vllm_result, Exception), vllm_result
    return torch_result, vllm_result


def assert_same_result(want, got, atol=1e-4):
    """The torch sampler's SampleResult and the glue's: same tokens, stop reasons, top-k ids and NaN
    layout; logprobs equal up to float rounding of two different computations."""
    assert len(got.sequences) == len(want.sequences)
    for a, b in zip(want.sequences, got.sequences):
        assert b.tokens.dtype == np.int32 and b.logprobs.dtype == np.float32
        np.testing.assert_array_equal(b.tokens, a.tokens)
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=atol)
        assert b.stop_reason == a.stop_reason
        for name in ("topk_token_ids", "topk_logprobs"):
            assert (getattr(a, name) is None) == (getattr(b, name) is None), name
        if a.topk_token_ids is not None:
            assert b.topk_token_ids.dtype == np.int32 and b.topk_token_ids.shape == a.topk_token_ids.shape
            np.testing.assert_array_equal(b.topk_token_ids, a.topk_token_ids)
            np.testing.assert_allclose(b.topk_logprobs, a.topk_logprobs, atol=atol)
    for name in ("prompt_logprobs", "topk_prompt_token_ids", "topk_prompt_logprobs"):
        a, b = getattr(want, name), getattr(got, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert b.dtype == a.dtype and b.shape == a.shape, name
            np.testing.assert_array_equal(np.isnan(b), np.isnan(a))
            np.testing.assert_allclose(b, a, atol=atol, equal_nan=True)
    assert got.target_prompt_logprobs is None


# --- without vLLM -------------------------------------------------------------------------------


def test_without_vllm_the_backend_names_the_extra(engine_hf_home):
    """vllm is not installed here: choosing the backend fails at once, saying what to install."""
    with pytest.raises(VllmUnavailable, match=INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")):
        load_vllm()
    with pytest.raises(VllmUnavailable, match="tinkex\\[vllm\\]"):
        Engine([M], hf_home=engine_hf_home, sampler_backend="vllm")
    with pytest.raises(EngineError, match="sampler backend 'tpu'"):
        Engine([M], hf_home=engine_hf_home, sampler_backend="tpu")


def test_tinkex_serve_with_the_vllm_backend_says_what_to_install(engine_hf_home, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from tinkex.cli import main

    monkeypatch.setenv("HF_HOME", str(engine_hf_home))
    result = CliRunner().invoke(main, ["serve", "--sampler-backend", "vllm", "--data-dir", str(tmp_path),
                                       "--port", "0", "--threads", "1"])
    assert result.exit_code == 1 and INSTALL_HINT in result.output, result.output
    result = CliRunner().invoke(main, ["serve", "--vllm-engine-args", "[0.5]", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "must be a JSON object" in result.output


# --- parameters ---------------------------------------------------------------------------------


def test_every_sample_job_field_maps_onto_sampling_params(engine, vllm):
    eos = sorted(engine._bases[M].eos_ids)
    cases = [
        (dict(), dict(n=1, max_tokens=16, temperature=1.0, top_p=1.0, top_k=-1, seed=None, stop=None,
                      stop_token_ids=eos, ignore_eos=False, logprobs=0, prompt_logprobs=None, detokenize=False,
                      output_kind=RequestOutputKind.FINAL_ONLY)),
        (dict(num_samples=3, max_tokens=5, temperature=0.7, top_p=0.9, top_k=40, seed=11),
         dict(n=3, max_tokens=5, temperature=0.7, top_p=0.9, top_k=40, seed=11)),
        (dict(num_samples=4, temperature=0.0), dict(n=1, temperature=0.0)),  # greedy: one run for all samples
        (dict(top_k=0), dict(top_k=-1)),
        (dict(top_k=5000), dict(top_k=-1)),  # at least the vocabulary: no limit
        (dict(seed=2**64 - 1), dict(seed=(2**64 - 1) % 2**63)),
        (dict(stop_strings=["\n\n", "END"]), dict(stop=["\n\n", "END"], detokenize=True, skip_special_tokens=False)),
        (dict(stop_token_ids=[]), dict(stop_token_ids=[], ignore_eos=True)),
        (dict(stop_token_ids=[7, 5]), dict(stop_token_ids=[5, 7], ignore_eos=True)),
        (dict(topk_sample_logprobs=4), dict(logprobs=4)),
        (dict(prompt_logprobs=True), dict(prompt_logprobs=0)),
        (dict(topk_prompt_logprobs=3), dict(prompt_logprobs=3)),
        (dict(prompt_logprobs=True, topk_prompt_logprobs=2), dict(prompt_logprobs=2)),
        (dict(max_tokens=0, prompt_logprobs=True), dict(max_tokens=1)),
        (dict(on_tokens=lambda s, t: None), dict(output_kind=RequestOutputKind.CUMULATIVE)),
    ]
    fake = _fake(vllm)
    for kwargs, expected in cases:
        assert vllm.submit_samples([_job(**kwargs)]) == []
        _, params, lora = fake.added[-1]
        for name, value in expected.items():
            assert getattr(params, name) == value, (kwargs, name)
        assert lora == vllm.lora_request("ckpt")
    vllm.submit_samples([_job(adapter_id=None)])
    assert fake.added[-1][2] is None  # the bare base model: no LoRA
    while vllm.sampling:
        vllm.step_samples()
    assert fake.args.logprobs_mode == "raw_logprobs" and fake.args.enable_lora and fake.args.max_logprobs == 20
    assert fake.args.model == str(engine._bases[M].directory)


def test_what_vllm_cannot_serve_is_refused_with_engine_errors(engine, vllm):
    bad = {
        "target_prompt_tokens": _job(target_prompt_tokens=np.zeros((len(PROMPT) - 1, 2), np.int64)),
        "topk_sample_logprobs=21 exceeds": _job(topk_sample_logprobs=21),
        "topk_prompt_logprobs=30 exceeds": _job(topk_prompt_logprobs=30),
        "temperature must be": _job(temperature=-1.0),  # the torch sampler's own checks and messages
        "outside the vocabulary": _job(prompt=[1, 99999]),
        "not served here": _job(base_model="nope/none"),
        "not loaded in the vLLM sampler": _job(adapter_id="never-registered"),
    }
    refused = vllm.submit_samples(list(bad.values()))
    assert [job for job, _ in refused] == list(bad.values())
    for (message, _), (_, exc) in zip(bad.items(), refused):
        assert isinstance(exc, EngineError) and message in str(exc), (message, exc)
    assert not vllm.sampling and _fake(vllm).requests == {}


# --- results --------------------------------------------------------------------------------------


def test_greedy_results_equal_the_torch_samplers(engine, vllm, trained):
    """For the same inputs the glue returns the torch sampler's SampleResult: tokens, logprobs,
    stop reasons, top-k tables with sentinels, prompt logprobs with NaN at 0."""
    cases = [
        dict(adapter_id=None, max_tokens=8, temperature=0.0, stop_token_ids=[]),
        dict(max_tokens=10, temperature=0.0, stop_token_ids=[], num_samples=3),
        dict(max_tokens=6, temperature=0.0, stop_token_ids=[], topk_sample_logprobs=5),
        dict(max_tokens=3, temperature=0.0, prompt_logprobs=True, topk_prompt_logprobs=4),
        dict(max_tokens=3, temperature=0.0, prompt_logprobs=True, prompt_logprobs_last_n=5, topk_prompt_logprobs=2),
        dict(max_tokens=0, prompt_logprobs=True, topk_sample_logprobs=2, num_samples=2),  # compute_logprobs
        dict(prompt=PROMPT[:1], max_tokens=4, temperature=0.0, prompt_logprobs=True, topk_prompt_logprobs=3),
    ]
    for kwargs in cases:
        want, got = _both(engine, vllm, **kwargs)
        assert_same_result(want, got)
    want, got = _both(engine, vllm, max_tokens=3, temperature=0.0, topk_prompt_logprobs=4)
    assert got.topk_prompt_token_ids[0].tolist() == [TOPK_SENTINEL[0]] * 4  # row 0: the sentinel
    assert got.topk_prompt_logprobs[0].tolist() == [TOPK_SENTINEL[1]] * 4
    want, got = _both(engine, vllm, max_tokens=0, prompt_logprobs=True)
    assert np.isnan(got.prompt_logprobs[0]) and not np.isnan(got.prompt_logprobs[1:]).any()
    assert [len(seq.tokens) for seq in got.sequences] == [0] and got.sequences[0].stop_reason == "length"


def test_eos_and_stop_tokens_end_samples_as_the_torch_sampler_does(engine, vllm, trained):
    """The trained checkpoint answers " meow<|im_end|>": EOS stops it (stop_token_ids None), [] does not,
    explicit ids replace EOS; and a stop token drawn as the last allowed token is a "stop" (vLLM
    itself reports "length" there)."""
    tok = trained.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    want, got = _both(engine, vllm, prompt=trained.prompt, max_tokens=10, temperature=0.0)
    assert_same_result(want, got)
    answer = got.sequences[0].tokens.tolist()
    assert tok.decode(answer) == " meow<|im_end|>" and answer[-1] == eos and got.sequences[0].stop_reason == "stop"
    for kwargs in (dict(stop_token_ids=[]), dict(stop_token_ids=[answer[0]]), dict(max_tokens=len(answer)),
                   dict(stop_token_ids=[answer[0]], max_tokens=1), dict(num_samples=2)):
        want, got = _both(engine, vllm, **{"prompt": trained.prompt, "max_tokens": 10, "temperature": 0.0, **kwargs})
        assert_same_result(want, got)
    assert got.sequences[1].stop_reason == "stop"
    # what the stand-in (as vLLM) says itself of EOS as the last allowed token, which the glue corrected above
    fake = _fake(vllm)
    fake.add_request("probe", {"prompt_token_ids": trained.prompt},
                     SamplingParams(max_tokens=len(answer), temperature=0.0, stop_token_ids=[eos]),
                     lora_request=vllm.lora_request("ckpt"))
    outputs = []
    while fake.has_unfinished_requests():
        outputs += fake.step()
    assert outputs[-1].outputs[0].token_ids == answer and outputs[-1].outputs[0].finish_reason == "length"


def test_stop_strings(engine, vllm, trained):
    tok = trained.tokenizer
    free = _both(engine, vllm, max_tokens=12, temperature=0.0, stop_token_ids=[])[0].sequences[0]
    stop = tok.decode(free.tokens[4:6])  # spans two tokens
    for kwargs in (dict(stop_strings=[stop, "never \u2603"]), dict(stop_strings=["<|im_end|>"], prompt=trained.prompt)):
        want, got = _both(engine, vllm, **{"max_tokens": 12, "temperature": 0.0, "stop_token_ids": [], **kwargs})
        assert_same_result(want, got)
        assert got.sequences[0].stop_reason == "stop"


def test_random_samples_report_raw_logprobs_and_repeat_with_a_seed(engine, vllm):
    """vLLM's draws are not the torch sampler's, but what it reports about them must be: the logprobs of
    the unmodified distribution (not the temperature / top-k / top-p shaped one), per sample."""
    kwargs = dict(num_samples=3, max_tokens=6, temperature=0.8, top_k=50, top_p=0.9, seed=5, stop_token_ids=[],
                  topk_sample_logprobs=3)
    (first,), (again,) = vllm.sample([_job(**kwargs)]), vllm.sample([_job(**kwargs)])
    assert len(first.sequences) == 3 and len({tuple(s.tokens) for s in first.sequences}) > 1
    for seq, same in zip(first.sequences, again.sequences):
        np.testing.assert_array_equal(seq.tokens, same.tokens)
        assert seq.stop_reason == "length" and len(seq.tokens) == 6
        full = full_logprobs(engine, "ckpt", PROMPT + seq.tokens[:-1].tolist())[len(PROMPT) - 1:]
        np.testing.assert_allclose(seq.logprobs, full[np.arange(6), seq.tokens], atol=1e-4)
        np.testing.assert_array_equal(seq.topk_token_ids, np.argsort(-full, axis=1, kind="stable")[:, :3])
        np.testing.assert_allclose(seq.topk_logprobs, -np.sort(-full, axis=1)[:, :3], atol=1e-4)


def test_streaming_calls_on_tokens_as_the_torch_sampler_does(engine, vllm):
    """Every sample is streamed token by token, ending with its result's tokens (greedy: the very
    calls the torch sampler makes; random, n > 1: vLLM streams each sample in its own output)."""
    for kwargs in (dict(num_samples=2, temperature=0.0), dict(num_samples=3, seed=9)):
        calls = {"torch": [], "vllm": []}
        for name, run in (("torch", engine.sample), ("vllm", vllm.sample)):
            job = _job(max_tokens=5, stop_token_ids=[], **kwargs,
                       on_tokens=lambda s, tokens, out=calls[name]: out.append((s, list(tokens))))
            (result,) = run([job])
            for s, seq in enumerate(result.sequences):
                mine = [tokens for index, tokens in calls[name] if index == s]
                assert mine == [seq.tokens[:n].tolist() for n in range(1, 6)], (name, s)
        if kwargs.get("temperature") == 0.0:
            assert sorted(calls["vllm"]) == sorted(calls["torch"])


# --- adapters -------------------------------------------------------------------------------------


def test_sampler_checkpoints_become_lora_requests_with_ids_never_reused(engine, vllm, trained, tmp_path):
    first = vllm.lora_request("ckpt")
    assert (first.lora_name, first.lora_path) == ("ckpt", str(trained.directory)) and first.lora_int_id >= 1
    fake = _fake(vllm)
    assert first.lora_int_id in fake.models  # loaded at once, as vLLM's add_lora does
    for _ in range(2):  # every request on it carries the same LoRARequest
        vllm.sample([_job(max_tokens=2, temperature=0.0)])
        assert fake.added[-1][2] is first
    with pytest.raises(EngineError, match="already registered"):
        vllm.add_adapter("ckpt", trained.directory, M, rank=8)
    vllm.add_adapter("other", trained.directory, M, rank=8)
    assert vllm.lora_request("other").lora_int_id == first.lora_int_id + 1
    # removed and registered again (say, from a new directory): a new id, so vLLM cannot serve the old weights
    running = _job(adapter_id="other", max_tokens=50, stop_token_ids=[])
    vllm.submit_samples([running])
    vllm.step_samples()
    vllm.remove_adapter("other")
    assert fake.removed_loras[-1] == first.lora_int_id + 1
    ((job, exc),) = vllm.step_samples()  # its running request fails, the others go on
    assert job is running and isinstance(exc, EngineError) and "was removed" in str(exc)
    vllm.add_adapter("other", trained.directory, M, rank=8)
    assert vllm.lora_request("other").lora_int_id == first.lora_int_id + 2
    with pytest.raises(EngineError, match="max_lora_rank"):
        vllm.add_adapter("big", trained.directory, M, rank=128)
    broken = tmp_path / "not-an-adapter"
    broken.mkdir()
    with pytest.raises(EngineError, match="vLLM cannot load the adapter"):
        vllm.add_adapter("broken", broken, M, rank=8)
    assert not vllm.serves(_job(adapter_id="broken"))


def test_the_engine_routes_samples_to_vllm_and_live_adapters_to_torch(engine_hf_home, trained, tmp_path):
    """Engine(sampler_backend="vllm") with the stand-in in place of vllm: sampler checkpoints and the
    base model go to vLLM, a live training adapter stays on the torch sampler, removal cancels."""
    eng = Engine([M], hf_home=engine_hf_home)
    eng._vllm = VllmSampler(eng._base, vllm=FAKE_VLLM)  # what sampler_backend="vllm" builds, over the stand-in
    eng.load_sampler_weights("snap", trained.directory)
    eng.create_adapter("live", M, LoraSpec(rank=4, seed=1))
    assert eng.has_adapter("snap") and eng._vllm.serves(_job(adapter_id="snap"))
    jobs = [_job(adapter_id=a, max_tokens=4, temperature=0.0, stop_token_ids=[]) for a in ("snap", None, "live")]
    jobs.append(_job(adapter_id="snap", max_tokens=4, target_prompt_tokens=np.zeros((len(PROMPT) - 1, 1), int)))
    refused = eng.submit_samples(jobs)
    assert [job for job, _ in refused] == [jobs[3]] and "target_prompt_tokens" in str(refused[0][1])
    fake = eng._vllm._engine(M)
    assert [lora and lora.lora_name for _, _, lora in fake.added] == ["snap", None]  # not "live"
    done = {}
    while eng.sampling:
        done.update((id(job), result) for job, result in eng.step_samples())
    assert len(done) == 3
    reference = eng.sample([_job(adapter_id=a, max_tokens=4, temperature=0.0, stop_token_ids=[])
                            for a in ("snap", None, "live")])
    for job, want in zip(jobs, reference):
        assert_same_result(want, done[id(job)])
    # removing a sampler adapter fails its running vLLM request and unloads it from vLLM
    snap_id = eng._vllm.lora_request("snap").lora_int_id
    eng.submit_samples([jobs[0]])
    eng.step_samples()
    eng.remove_adapter("snap")
    ((job, exc),) = eng.step_samples()
    assert job is jobs[0] and "was removed" in str(exc) and not eng.sampling
    assert not eng._vllm.serves(jobs[0]) and fake.removed_loras == [snap_id]
    # an adapter vLLM refuses is not left half-loaded in the engine
    with pytest.raises(EngineError, match="max_lora_rank"):
        eng._vllm.engine_args["max_lora_rank"] = 4
        eng.load_sampler_weights("too-big", trained.directory)
    assert not eng.has_adapter("too-big")


def test_a_failing_vllm_step_fails_its_requests_and_keeps_serving(vllm):
    fake = _fake(vllm)
    jobs = [_job(max_tokens=30, stop_token_ids=[]), _job(adapter_id=None, max_tokens=30, stop_token_ids=[])]
    vllm.submit_samples(jobs)
    real_step = fake.step
    fake.step = lambda: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access"))
    try:
        done = vllm.step_samples()
    finally:
        fake.step = real_step
    assert [job for job, _ in done] == jobs and all("illegal memory" in str(exc) for _, exc in done)
    assert not vllm.sampling and fake.requests == {}  # aborted in vLLM too
    (result,) = vllm.sample([_job(max_tokens=2, temperature=0.0)])
    assert len(result.sequences[0].tokens) == 2


# --- through the server ---------------------------------------------------------------------------


def test_through_the_server_snapshots_sample_on_vllm_and_inflight_samplers_on_torch(engine_hf_home, tmp_path,
                                                                                      monkeypatch):
    """`sampler_backend="vllm"` from the server settings down (vllm replaced by the stand-in): a
    snapshot sampler's requests go to vLLM and come back over the wire as the torch sampler answers
    them; an inflight sampler, which follows the training weights, is answered by the torch sampler."""
    import tinkex
    from tinkex import types
    from tinkex.engine import vllm_sampler
    from tinkex.server import EmbeddedServer

    monkeypatch.setattr(vllm_sampler, "load_vllm", lambda: FAKE_VLLM)
    monkeypatch.setenv("HF_HOME", str(engine_hf_home))
    server = EmbeddedServer(tmp_path, sampler_backend="vllm", torch_threads=1).start()
    service = tinkex.ServiceClient(base_url=server.base_url, api_key=server.api_key)
    try:
        trainer = service.create_lora_training_client(base_model=M, rank=8, seed=4).result()
        tokens = PROMPT + [7, 9, 11]
        datum_ = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                             loss_fn_inputs={"target_tokens": np.array(tokens[1:]),
                                             "weights": np.ones(len(tokens) - 1, np.float32)})
        for _ in range(3):
            trainer.forward_backward([datum_], "cross_entropy").result()
            trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        snapshot = trainer.save_weights_and_get_sampling_client().result()
        inflight = trainer.save_weights_and_get_sampling_client(kind="inflight").result()
        params = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
        got = snapshot.sample(types.ModelInput.from_ints(PROMPT), num_samples=2, sampling_params=params,
                              include_prompt_logprobs=True, topk_prompt_logprobs=3).result()
        fake = FakeLLMEngine.instances[-1]
        (_, sent, lora) = fake.added[-1]
        assert lora is not None and "snapshots" in lora.lora_path and sent.n == 1 and sent.prompt_logprobs == 3
        engine = server.runtime.engine
        (want,) = engine.sample([SampleJob(M, lora.lora_name, PROMPT, num_samples=2, max_tokens=6, temperature=0.0,
                                           stop_token_ids=[], prompt_logprobs=True, topk_prompt_logprobs=3)])
        assert len(got.sequences) == len(want.sequences) == 2
        for a, b in zip(want.sequences, got.sequences):
            assert b.tokens == a.tokens.tolist() and b.stop_reason == a.stop_reason
            np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4)
        assert got.prompt_logprobs[0] is None
        np.testing.assert_allclose(got.prompt_logprobs[1:], want.prompt_logprobs[1:], atol=1e-4)
        requests = len(fake.added)
        live = inflight.sample(types.ModelInput.from_ints(PROMPT), num_samples=1, sampling_params=params).result()
        assert len(fake.added) == requests and len(live.sequences[0].tokens) == 6  # the torch sampler's
    finally:
        service.close()
        server.stop()
