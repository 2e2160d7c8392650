"""Sampling: 32 concurrent requests x 64 new tokens against Hugging Face `generate` on the same model
with the same 32 prompts in one batch (do_sample, temperature 1), in this process; on the built-in
model, a 32 M-parameter Llama, and a Llama with a 32k-token vocabulary (as real models have). Tokens/s:

- tinkex: through the whole stack (SDK -> HTTP -> server -> scheduler -> engine), with `tinkex serve`
  in a process of its own (`--server embedded`: the embedded server in this process);
- engine: the engine alone (submit_samples / step_samples, no server), to show where time goes;
- HF generate, batched: the baseline.

Each is run `--repeats` times, interleaved, and the medians are compared. Also the time to first
token, and the stack's fixed cost: 32 concurrent requests of one token each.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/sampling.py [--repeats 3] [--server process|embedded]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import build_llama_30m, build_llama_wide_vocab, start_server

KEY = "tml-bench-key-000000"
REQUESTS, NEW_TOKENS, PROMPT = 32, 64, 16


def hf_generator(model_name: str, prompts: np.ndarray):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32).eval()
    inputs = torch.tensor(prompts)
    with torch.inference_mode():
        model.generate(inputs[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up

    def run() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, pad_token_id=0)
        return REQUESTS * NEW_TOKENS / (time.perf_counter() - start)

    return run


def engine_runner(model_name: str, prompts: np.ndarray, hf_home: Path):
    from tinkex.engine import Engine, SampleJob

    engine = Engine([model_name], hf_home=hf_home)

    def run(max_tokens: int = NEW_TOKENS) -> float:
        jobs = [SampleJob(model_name, None, p.tolist(), max_tokens=max_tokens, temperature=1.0, seed=i,
                          stop_token_ids=[]) for i, p in enumerate(prompts)]
        start = time.perf_counter()
        engine.submit_samples(jobs)
        done = 0
        while engine.sampling:
            done += len(engine.step_samples())
        assert done == REQUESTS
        return REQUESTS * max_tokens / (time.perf_counter() - start)

    run(4)  # warm-up
    return run


async def stack_runner(service, model_name: str, prompts: np.ndarray):
    from tinkex import types

    sampler = await service.create_sampling_client(base_model=model_name)
    await sampler.sample_async(types.ModelInput.from_ints(prompts[0].tolist()), 1,
                               types.SamplingParams(max_tokens=4, stop=[]))  # warm-up

    async def ttft() -> float:
        start = time.perf_counter()
        first = await sampler.sample_async(types.ModelInput.from_ints(prompts[0].tolist()), 1,
                                           types.SamplingParams(max_tokens=1, stop=[]))
        assert first.sequences
        return time.perf_counter() - start

    async def run(max_tokens: int = NEW_TOKENS) -> float:
        """32 concurrent requests; seconds taken."""
        params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, stop=[], seed=1)
        start = time.perf_counter()
        results = await asyncio.gather(*(sampler.sample_async(types.ModelInput.from_ints(p.tolist()), 1, params)
                                         for p in prompts))
        assert all(len(r.sequences[0].tokens) == max_tokens for r in results)
        return time.perf_counter() - start

    return ttft, run


def main() -> None:
    import tinkex

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    # process: the baseline runs alone in this process (next to an embedded server, HF generate measures
    # about half as fast)
    parser.add_argument("--server", choices=["embedded", "process"], default="process")
    args = parser.parse_args()
    prompts = np.random.default_rng(0).integers(3, 2000, size=(REQUESTS, PROMPT))
    with tempfile.TemporaryDirectory() as tmp:
        llama = build_llama_30m(Path(tmp) / "llama-30m")
        wide = build_llama_wide_vocab(Path(tmp) / "llama-wide-vocab")
        models = [("tinkex/tiny-qwen3", "tinkex/tiny-qwen3"), ("Llama 32 M", str(llama)),
                  ("Llama 32k vocab", str(wide))]
        with start_server(args.server, Path(tmp) / "data", [name for _, name in models], KEY) as base_url:
            service = tinkex.ServiceClient(base_url=base_url, api_key=KEY)
            where = "tinkex serve in its own process" if args.server == "process" else "the embedded server"
            print(f"{REQUESTS} concurrent requests x {NEW_TOKENS} new tokens, prompts of {PROMPT} tokens, through "
                  f"{where}; medians of {args.repeats} interleaved runs")
            loop = asyncio.new_event_loop()
            for label, name in models:
                ttft, stack = loop.run_until_complete(stack_runner(service, name, prompts))
                engine = engine_runner(name, prompts, Path(tmp) / "hf")
                hf = hf_generator(name, prompts)
                runs = {"stack": [], "engine": [], "hf": [], "ttft": [], "fixed": []}
                for _ in range(args.repeats):
                    runs["stack"].append(REQUESTS * NEW_TOKENS / loop.run_until_complete(stack()))
                    runs["engine"].append(engine())
                    runs["hf"].append(hf())
                    runs["ttft"].append(loop.run_until_complete(ttft()))
                    runs["fixed"].append(loop.run_until_complete(stack(1)))
                m = {key: statistics.median(values) for key, values in runs.items()}
                print(f"{label:18} tinkex {m['stack']:8,.0f} tok/s | engine alone {m['engine']:8,.0f} tok/s | "
                      f"HF generate, batched {m['hf']:8,.0f} tok/s | ratio {m['stack'] / m['hf']:.2f} "
                      f"(engine alone {m['engine'] / m['hf']:.2f})")
                print(f"{'':18} first token {m['ttft'] * 1e3:.0f} ms; 32 requests of 1 token through the stack "
                      f"{m['fixed'] * 1e3:.0f} ms; runs tinkex {_list(runs['stack'])}, engine {_list(runs['engine'])}, "
                      f"HF {_list(runs['hf'])}")
            loop.close()
            service.close()


def _list(values: list[float]) -> str:
    return "/".join(f"{v:,.0f}" for v in values)


if __name__ == "__main__":
    main()
