"""Training throughput: forward_backward + optim_step through the whole stack against raw PyTorch + peft.

The same model, batch, loss weights, LoRA rank and optimizer in both: the built-in model and a ~32
M-parameter Llama built on the fly, every token trained; then chat-style batches that train only the
last quarter of each row (the reply), on the 32 M Llama and on a Llama with a 32k-token vocabulary,
where the unembedding is most of the work (the raw loop, like most, masks the loss and runs the
whole head backward). The raw loop runs in this process; the full stack is the tinkex SDK in this
process against `tinkex serve` in a process of its own (`--server embedded`: the embedded server in
this process, the cookbook's default, whose Python shares one GIL with the SDK's). Prints tokens/s
and the ratio (full stack / raw loop).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_throughput.py [--steps 8] [--server process|embedded]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _common import (
    build_llama_30m,
    build_llama_wide_vocab,
    random_batch,
    raw_peft_step_fn,
    reply_weights,
    start_server,
    timed,
    to_datums,
)

KEY = "tml-bench-key-000000"


def full_stack_step_fn(service, model: str, batch, rank: int, weights):
    from tinkex import types

    trainer = service.create_lora_training_client(base_model=model, rank=rank, seed=0).result()
    datums = to_datums(types, batch, weights)
    adam = types.AdamParams(learning_rate=1e-4)

    def step() -> None:
        fwd_bwd = trainer.forward_backward(datums, "cross_entropy")
        optim = trainer.optim_step(adam)
        fwd_bwd.result()
        optim.result()

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--server", choices=["process", "embedded"], default="process")
    args = parser.parse_args()

    import tinkex

    with tempfile.TemporaryDirectory() as tmp:
        llama, wide = build_llama_30m(Path(tmp) / "llama-30m"), build_llama_wide_vocab(Path(tmp) / "llama-wide")
        cases = [("tinkex/tiny-qwen3 (built in)", "tinkex/tiny-qwen3", 1.0),
                 ("Llama 32 M (hidden 512, 10 layers)", str(llama), 1.0),
                 ("Llama 32 M, replies only", str(llama), 0.25),
                 ("Llama, 32k vocabulary, replies only", str(wide), 0.25)]
        models = ["tinkex/tiny-qwen3", str(llama), str(wide)]
        with start_server(args.server, Path(tmp) / "data", models, KEY) as base_url:
            service = tinkex.ServiceClient(base_url=base_url, api_key=KEY)
            print(f"server: {'tinkex serve in its own process' if args.server == 'process' else 'embedded'}; "
                  f"8 x 128 tokens, LoRA rank 32; 'replies only': loss weights on the last quarter of each row")
            print(f"{'model':38} {'raw torch+peft':>16} {'tinkex full stack':>18} {'ratio':>6}")
            for label, model, share in cases:
                batch = random_batch(8, 128, 2000)
                weights, tokens = reply_weights(batch, share), 8 * 128
                raw = statistics.median(timed(raw_peft_step_fn(model, batch, 32, weights=weights), args.steps, warmup=1))
                full = statistics.median(timed(full_stack_step_fn(service, model, batch, 32, weights), args.steps,
                                               warmup=1))
                print(f"{label:38} {tokens / raw:>12,.0f} t/s {tokens / full:>14,.0f} t/s {raw / full:>6.2f}")
            service.close()


if __name__ == "__main__":
    main()
