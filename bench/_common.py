"""Shared pieces of the benchmarks: models built on the fly, batches, a raw PyTorch + peft baseline."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_llama_30m(directory: Path) -> Path:
    """A ~32 M-parameter Llama (hidden 512, 10 layers, vocabulary 2048), random-init, saved once."""
    return build_llama(directory, vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=10,
                       num_attention_heads=8, num_key_value_heads=4)


def build_llama_wide_vocab(directory: Path) -> Path:
    """A Llama whose unembedding outweighs its layers, as in real models (a 32,768-token vocabulary,
    hidden 384, 4 layers: 12.6 M of its 17.3 M parameters are the tied embedding), saved once."""
    return build_llama(directory, vocab_size=32768, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                       num_attention_heads=6, num_key_value_heads=2)


def build_llama(directory: Path, **config) -> Path:
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tinkex.engine import builtin

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=True, **config)
                     ).save_pretrained(directory)
    # The built-in model's tokenizer (2,048 tokens) serves these models too.
    snapshot = builtin.materialize(builtin.hub_cache_dir())
    AutoTokenizer.from_pretrained(snapshot).save_pretrained(directory)
    return directory


def random_batch(n: int, length: int, vocab: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input tokens, target tokens) pairs: next-token prediction on random sequences."""
    rng = np.random.default_rng(seed)
    batch = []
    for _ in range(n):
        tokens = rng.integers(3, vocab, size=length + 1)
        batch.append((tokens[:-1], tokens[1:]))
    return batch


def reply_weights(batch, share: float) -> np.ndarray:
    """Loss weights [rows, length] that train only the last `share` of each row, as chat data trains
    the reply and not the prompt (1.0: every token)."""
    length = len(batch[0][1])
    weights = np.zeros((len(batch), length), np.float32)
    weights[:, length - round(share * length):] = 1
    return weights


def to_datums(types, batch, weights: np.ndarray | None = None):
    """Datums of (input, target) pairs; `weights` [rows, length] (rows of one length), else all ones."""
    weights = [np.ones(len(target), np.float32) for _, target in batch] if weights is None else weights
    return [types.Datum(model_input=types.ModelInput.from_ints(inp.tolist()),
                        loss_fn_inputs={"target_tokens": tgt.astype(np.int64), "weights": w})
            for (inp, tgt), w in zip(batch, weights)]


def raw_peft_step_fn(model_name: str, batch, rank: int, learning_rate: float = 1e-4,
                     weights: np.ndarray | None = None):
    """The baseline: the same model, batch, loss weights, LoRA rank and AdamW, as a plain PyTorch +
    peft loop."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate,
                                  betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    inputs = torch.tensor(np.stack([b[0] for b in batch]))
    targets_t = torch.tensor(np.stack([b[1] for b in batch]))
    weights_t = torch.ones(targets_t.shape) if weights is None else torch.from_numpy(weights)

    def step() -> None:
        logits = model(input_ids=inputs).logits
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, targets_t[..., None])[..., 0]
        (-(logprobs * weights_t).sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"median {statistics.median(times) * 1e3:.1f} ms, p95 {p95 * 1e3:.1f} ms"


@contextlib.contextmanager
def serve_process(data_dir: Path, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`tinkex serve --port 0 --data-dir DATA_DIR ARGS...` in a process of its own: yields the process
    and its base URL once it serves, and stops it on the way out."""
    server = subprocess.Popen([sys.executable, "-m", "tinkex.cli", "serve", "--port", "0", "--data-dir",
                               str(data_dir), *args], stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("tinkex serving on"):
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                raise RuntimeError(f"tinkex serve exited with {server.returncode}")
        yield server, line.split()[-1]
    finally:
        server.terminate()
        server.wait()


@contextlib.contextmanager
def start_server(where: str, data_dir: Path, models: list[str], key: str) -> Iterator[str]:
    """A tinkex server for these models with this API key; yields its base URL. `where`: "process" --
    `tinkex serve` in a process of its own, as deployed; "embedded" -- the embedded server in this
    process, the cookbook's default, whose Python then shares one GIL with the benchmark's."""
    if where == "embedded":
        from tinkex.server import EmbeddedServer

        with EmbeddedServer(data_dir=data_dir, api_keys={key: "bench"}, base_models=models) as server:
            yield server.base_url
        return
    with serve_process(data_dir, "--api-key", key, *(arg for model in models for arg in ("--model", model))) as (_, url):
        yield url
