"""Step latency: pipelined forward_backward + optim_step of 8 short sequences on the built-in model.

Through the whole stack (tinkex SDK -> HTTP -> server -> engine) against the same step called on the
engine directly in this process, plus the time from `tinkex serve` to its first finished step.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/step_latency.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import random_batch, serve_process, summary, timed, to_datums

STEPS = 60
KEY = "tml-bench-key-000000"


def serve_to_first_step(data_dir: Path) -> tuple[float, float]:
    """Seconds from launching `tinkex serve` to ready, and to the first finished training step."""
    import tinkex
    from tinkex import types

    start = time.perf_counter()
    with serve_process(data_dir, "--api-key", KEY) as (_, base_url):
        ready = time.perf_counter() - start
        service = tinkex.ServiceClient(base_url=base_url, api_key=KEY)
        trainer = service.create_lora_training_client(base_model="tinkex/tiny-qwen3", rank=32).result()
        datums = to_datums(types, random_batch(8, 14, 2000))
        trainer.forward_backward(datums, "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=1e-4)).result()
        first_step = time.perf_counter() - start
        service.close()
        return ready, first_step


def main() -> None:
    import tinkex
    from tinkex import types
    from tinkex.engine import AdamHyper, DatumArrays, Engine, ForwardBackwardJob, LoraSpec
    from tinkex.server import EmbeddedServer

    batch = random_batch(8, 14, 2000)  # 8 sequences, 112 target tokens
    with tempfile.TemporaryDirectory() as tmp:
        # baseline: the engine called directly, same model, batch, rank and optimizer
        engine = Engine()
        engine.create_adapter("direct", "tinkex/tiny-qwen3", LoraSpec(rank=32, seed=0))
        job = ForwardBackwardJob("direct", [DatumArrays(i.astype(np.int64), {"target_tokens": t.astype(np.int64),
                                                                               "weights": np.ones(len(t), np.float32)})
                                            for i, t in batch], "cross_entropy")
        hyper = AdamHyper(learning_rate=1e-4)

        def direct_step() -> None:
            engine.forward_backward([job])
            engine.optim_step("direct", hyper)

        direct = timed(direct_step, STEPS)

        with EmbeddedServer(data_dir=Path(tmp) / "data", api_keys={KEY: "bench"}) as server:
            service = tinkex.ServiceClient(base_url=server.base_url, api_key=KEY)
            trainer = service.create_lora_training_client(base_model="tinkex/tiny-qwen3", rank=32, seed=0).result()
            datums = to_datums(types, batch)
            adam = types.AdamParams(learning_rate=1e-4)

            def sdk_step() -> None:
                fwd_bwd = trainer.forward_backward(datums, "cross_entropy")  # both in flight together
                optim = trainer.optim_step(adam)
                fwd_bwd.result()
                optim.result()

            full = timed(sdk_step, STEPS)
            service.close()
        ready, first = serve_to_first_step(Path(tmp) / "serve")

    print("pipelined forward_backward + optim_step, 8 x 14 tokens, built-in model, LoRA rank 32")
    print(f"  full stack (tinkex SDK -> HTTP -> server -> engine): {summary(full)}")
    print(f"  engine called directly (baseline):                   {summary(direct)}")
    print(f"  overhead of the stack: {statistics.median(full) / statistics.median(direct):.1f}x the engine time, "
          f"+{(statistics.median(full) - statistics.median(direct)) * 1e3:.1f} ms")
    print(f"`tinkex serve` ready after {ready:.2f} s; first step finished {first:.2f} s after launch")


if __name__ == "__main__":
    main()
