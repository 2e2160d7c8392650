"""SDK overhead: the tinkex SDK against the official `tinker` SDK on the same server, same process.

A trivial request (get_server_capabilities) and a full pipelined training step of 8 short sequences.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/sdk_overhead.py
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from _common import random_batch, summary, timed, to_datums

KEY = "tml-bench-key-000000"
STEPS = 40


def measure(sdk, base_url: str) -> tuple[list[float], list[float]]:
    service = sdk.ServiceClient(base_url=base_url, api_key=KEY)
    rest = sdk.RestClient(base_url=base_url, api_key=KEY)
    trivial = timed(lambda: rest.get_server_capabilities().result(), STEPS)
    trainer = service.create_lora_training_client(base_model="tinkex/tiny-qwen3", rank=16, seed=0).result()
    datums = to_datums(sdk.types, random_batch(8, 14, 2000))
    adam = sdk.types.AdamParams(learning_rate=1e-4)

    def step() -> None:
        fwd_bwd = trainer.forward_backward(datums, "cross_entropy")
        optim = trainer.optim_step(adam)
        fwd_bwd.result()
        optim.result()

    steps = timed(step, STEPS)
    service.close("success")
    return trivial, steps


def main() -> None:
    import tinker

    import tinkex
    from tinkex.server import EmbeddedServer

    with tempfile.TemporaryDirectory() as tmp, EmbeddedServer(data_dir=Path(tmp), api_keys={KEY: "b"}) as server:
        ours = measure(tinkex, server.base_url)
        theirs = measure(tinker, server.base_url)
    for label, a, b in (("trivial request", ours[0], theirs[0]), ("training step", ours[1], theirs[1])):
        print(f"{label:16} tinkex SDK {summary(a)} | official SDK {summary(b)} | "
              f"ratio {statistics.median(a) / statistics.median(b):.2f}")


if __name__ == "__main__":
    main()
