"""Sampling: 32 concurrent requests x 64 new tokens, through the whole stack, against Hugging Face
`generate` on the same model with the same 32 prompts in one batch. Tokens/s and time to first token.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/sampling.py
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import build_llama_30m

KEY = "tml-bench-key-000000"
REQUESTS, NEW_TOKENS, PROMPT = 32, 64, 16


def hf_generate(model_name: str, prompts: np.ndarray) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32).eval()
    inputs = torch.tensor(prompts)
    with torch.inference_mode():
        model.generate(inputs[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        start = time.perf_counter()
        model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, pad_token_id=0)
    return REQUESTS * NEW_TOKENS / (time.perf_counter() - start)


async def tinkex_sample(service, model_name: str, prompts: np.ndarray) -> tuple[float, float]:
    from tinkex import types

    sampler = await service.create_sampling_client(base_model=model_name)
    params = types.SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, stop=[], seed=1)
    await sampler.sample_async(types.ModelInput.from_ints(prompts[0].tolist()), 1,
                               types.SamplingParams(max_tokens=4, stop=[]))  # warm-up
    start = time.perf_counter()
    first = await sampler.sample_async(types.ModelInput.from_ints(prompts[0].tolist()), 1,
                                       types.SamplingParams(max_tokens=1, stop=[]))
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    results = await asyncio.gather(*(sampler.sample_async(types.ModelInput.from_ints(p.tolist()), 1, params)
                                     for p in prompts))
    elapsed = time.perf_counter() - start
    assert first.sequences and all(len(r.sequences[0].tokens) == NEW_TOKENS for r in results)
    return REQUESTS * NEW_TOKENS / elapsed, ttft


def main() -> None:
    import tinkex
    from tinkex.server import EmbeddedServer

    prompts = np.random.default_rng(0).integers(3, 2000, size=(REQUESTS, PROMPT))
    with tempfile.TemporaryDirectory() as tmp:
        llama = build_llama_30m(Path(tmp) / "llama-30m")
        models = [("tinkex/tiny-qwen3", "tinkex/tiny-qwen3"), ("Llama 32 M", str(llama))]
        with EmbeddedServer(data_dir=Path(tmp) / "data", api_keys={KEY: "b"},
                            base_models=["tinkex/tiny-qwen3", str(llama)]) as server:
            service = tinkex.ServiceClient(base_url=server.base_url, api_key=KEY)
            print(f"{REQUESTS} concurrent requests x {NEW_TOKENS} new tokens, prompts of {PROMPT} tokens")
            for label, name in models:
                ours, ttft = asyncio.run(tinkex_sample(service, name, prompts))
                theirs = hf_generate(name, prompts)
                print(f"{label:18} tinkex {ours:8,.0f} tok/s (first token {ttft * 1e3:.0f} ms) | "
                      f"HF generate, batched {theirs:8,.0f} tok/s | ratio {ours / theirs:.2f}")
            service.close()


if __name__ == "__main__":
    main()
