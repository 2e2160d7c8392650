"""GPU check of the vLLM sampler backend: the same prompts through the torch sampler and through vLLM.

Needs Linux, an NVIDIA GPU and vllm (`pip install 'tinkex[vllm]'`); anywhere else it says so and
exits with status 2. From the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/vllm_check.py                       # built-in tiny-qwen3
    HF_HUB_OFFLINE=1 .venv/bin/python bench/vllm_check.py --model llama-30m     # a 32 M Llama, built here
    HF_HUB_OFFLINE=1 .venv/bin/python bench/vllm_check.py --model /path/to/hf-model-dir

It trains a LoRA adapter for a few steps (so that it changes the model), saves its sampler weights,
loads them with `Engine(sampler_backend="vllm").load_sampler_weights` (a vLLM LoRARequest), then runs
greedy requests two ways on the same engine: `Engine.sample` (the torch sampler, which that call always
uses) and `submit_samples`/`step_samples` (vLLM). It prints whether tokens, stop reasons, logprobs and
prompt logprobs match, and the decode tokens/s of each on a batch of concurrent requests. Exit status
0 when every sequence matches.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import build_llama_30m

from tinkex.engine import BUILTIN_MODEL, AdamHyper, DatumArrays, EngineError, ForwardBackwardJob, LoraSpec, SampleJob


def preflight() -> None:
    """Fail at once, clearly, where the check cannot run."""
    import torch

    from tinkex.engine.vllm_sampler import VllmUnavailable, load_vllm

    try:
        load_vllm()
    except VllmUnavailable as exc:
        print(f"vllm_check: {exc}", file=sys.stderr)
        sys.exit(2)  # not 1, which means a mismatch
    if not torch.cuda.is_available():
        print("vllm_check: no CUDA GPU here; vLLM needs one", file=sys.stderr)
        sys.exit(2)


def train_adapter(engine, base_model: str, rank: int, unembed: bool, vocab: int) -> str:
    adapter = "trained"
    engine.create_adapter(adapter, base_model, LoraSpec(rank=rank, seed=0, train_unembed=unembed))
    rng = np.random.default_rng(0)
    data = [DatumArrays(tokens=(seq := rng.integers(3, vocab, 65))[:-1],
                        inputs={"target_tokens": seq[1:], "weights": np.ones(64, np.float32)}) for _ in range(8)]
    for _ in range(10):
        engine.forward_backward([ForwardBackwardJob(adapter, data, "cross_entropy")])
        engine.optim_step(adapter, AdamHyper(learning_rate=1e-3))
    return adapter


def run_vllm(engine, jobs: list[SampleJob]) -> list:
    """The continuous interface, as the server drives it; results in the order of `jobs`."""
    where = {id(job): i for i, job in enumerate(jobs)}
    results = [None] * len(jobs)
    for job, exc in engine.submit_samples(jobs):
        results[where[id(job)]] = exc
    while engine.sampling:
        for job, result in engine.step_samples():
            results[where[id(job)]] = result
    return results


def compare(want, got) -> list[str]:
    """What differs between the torch sampler's result and vLLM's (empty: they match)."""
    problems = []
    if isinstance(got, Exception) or isinstance(want, Exception):
        return [f"error: torch {want!r} / vllm {got!r}"]
    for s, (a, b) in enumerate(zip(want.sequences, got.sequences)):
        if a.tokens.tolist() != b.tokens.tolist():
            first = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y),
                         min(len(a.tokens), len(b.tokens)))
            problems.append(f"sample {s}: tokens differ from position {first} of {len(a.tokens)}")
            continue
        if a.stop_reason != b.stop_reason:
            problems.append(f"sample {s}: stop reason {a.stop_reason} vs {b.stop_reason}")
        if len(a.logprobs) and np.abs(a.logprobs - b.logprobs).max() > 2e-3:
            problems.append(f"sample {s}: logprobs differ by {np.abs(a.logprobs - b.logprobs).max():.2g}")
    if want.prompt_logprobs is not None:
        diff = np.nanmax(np.abs(want.prompt_logprobs - got.prompt_logprobs)) if len(want.prompt_logprobs) > 1 else 0
        if diff > 2e-3 or not np.array_equal(np.isnan(want.prompt_logprobs), np.isnan(got.prompt_logprobs)):
            problems.append(f"prompt logprobs differ by {diff:.2g}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=BUILTIN_MODEL,
                        help="tinkex/tiny-qwen3, llama-30m (built on the fly), or a local HF model directory")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--no-unembed", action="store_true", help="no LoRA on lm_head (train_unembed=False)")
    parser.add_argument("--requests", type=int, default=32, help="concurrent requests in the throughput run")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32",
                        help="vLLM's dtype; float32 (the torch engine's) for an exact comparison")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs in vLLM (faster start)")
    args = parser.parse_args()
    preflight()

    from tinkex.engine import Engine

    work = Path(tempfile.mkdtemp(prefix="tinkex-vllm-check-"))
    model = str(build_llama_30m(work / "llama-30m")) if args.model == "llama-30m" else args.model
    engine = Engine([model], sampler_backend="vllm",
                    vllm_engine_args={"dtype": args.dtype, "gpu_memory_utilization": args.gpu_memory_utilization,
                                      "enforce_eager": args.enforce_eager,
                                      "max_lora_rank": max(8, 1 << (args.rank - 1).bit_length())})
    vocab = engine.model_info(model).vocab_size
    print(f"model {model} on {engine.device}; vLLM dtype {args.dtype}; LoRA rank {args.rank}"
          f"{'' if args.no_unembed else ' (with lm_head)'}")
    trained = train_adapter(engine, model, args.rank, not args.no_unembed, vocab)
    engine.save_sampler_weights(trained, work / "sampler")
    started = time.perf_counter()
    try:
        engine.load_sampler_weights("ckpt", work / "sampler")
    except EngineError as exc:
        print(f"vLLM refused the sampler checkpoint: {exc}\n(try --no-unembed if it is the lm_head LoRA)")
        return 1
    print(f"vLLM engine up and adapter loaded in {time.perf_counter() - started:.1f} s")

    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, vocab, int(rng.integers(8, 48))).tolist() for _ in range(args.requests)]

    def jobs(adapter, extras: bool, count: int) -> list[SampleJob]:
        return [SampleJob(model, adapter, prompt, max_tokens=args.max_tokens, temperature=0.0,
                          stop_token_ids=None if extras else [], prompt_logprobs=extras,
                          topk_sample_logprobs=5 if extras else 0) for prompt in prompts[:count]]

    # 1. The protocol: the same results, with EOS stops, prompt logprobs and top-k tables.
    failures = 0
    for adapter in ("ckpt", None):
        count = min(8, len(prompts))
        torch_results = engine.sample(jobs(adapter, True, count))
        vllm_results = run_vllm(engine, jobs(adapter, True, count))
        failed = 0
        for i, (want, got) in enumerate(zip(torch_results, vllm_results)):
            problems = compare(want, got)
            failed += bool(problems)
            for problem in problems:
                print(f"  {adapter or 'base'} prompt {i}: {problem}")
        failures += failed
        print(f"{adapter or 'base model'}: {count - failed} of {count} requests match (greedy, EOS stops, "
              "prompt logprobs, top-5 logprobs)")

    # 2. Throughput: concurrent requests of max_tokens new tokens each, no stops.
    run_vllm(engine, jobs("ckpt", False, 2))  # warm-up
    engine.sample(jobs("ckpt", False, 2))
    timings = {}
    for name, run in (("torch", engine.sample), ("vllm", lambda batch: run_vllm(engine, batch))):
        batch = jobs("ckpt", False, len(prompts))
        started = time.perf_counter()
        results = run(batch)
        seconds = time.perf_counter() - started
        produced = sum(len(seq.tokens) for result in results for seq in result.sequences)
        timings[name] = produced / seconds
        print(f"{name:5s}: {len(batch)} requests x {args.max_tokens} tokens in {seconds:.2f} s = "
              f"{timings[name]:,.0f} tokens/s")
    same = sum(a.sequences[0].tokens.tolist() == b.sequences[0].tokens.tolist()
               for a, b in zip(engine.sample(jobs("ckpt", False, len(prompts))),
                               run_vllm(engine, jobs("ckpt", False, len(prompts)))))
    print(f"throughput run: {same} of {len(prompts)} sequences identical; vllm / torch = "
          f"{timings['vllm'] / timings['torch']:.2f}x")
    return 0 if failures == 0 and same == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
