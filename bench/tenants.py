"""Many tenants on one base model: 1, 2, 4 and 8 training clients at once, each with its own adapter.

Aggregate training tokens/s (8 x 64-token sequences per step per client) and the server's resident
memory, against one client alone (the ratio shows cross-tenant batching at work).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/tenants.py
"""

from __future__ import annotations

import os
import resource
import tempfile
import threading
import time
from pathlib import Path

from _common import random_batch, to_datums

STEPS = 10
KEYS = {f"tml-bench-tenant-{i:02d}": f"tenant-{i}" for i in range(8)}


def run_clients(base_url: str, count: int) -> float:
    import tinkex
    from tinkex import types

    trainers = []
    for key in list(KEYS)[:count]:
        service = tinkex.ServiceClient(base_url=base_url, api_key=key)
        trainers.append(service.create_lora_training_client(base_model="tinkex/tiny-qwen3", rank=16).result())
    datums = to_datums(types, random_batch(8, 64, 2000))
    adam = types.AdamParams(learning_rate=1e-4)

    def loop(trainer) -> None:
        for _ in range(STEPS):
            fwd_bwd = trainer.forward_backward(datums, "cross_entropy")
            optim = trainer.optim_step(adam)
            fwd_bwd.result()
            optim.result()

    threads = [threading.Thread(target=loop, args=(t,)) for t in trainers]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return count * STEPS * 8 * 64 / (time.perf_counter() - start)


def main() -> None:
    from tinkex.server import EmbeddedServer

    with tempfile.TemporaryDirectory() as tmp, EmbeddedServer(data_dir=Path(tmp), api_keys=KEYS) as server:
        run_clients(server.base_url, 1)  # warm-up
        single = None
        print(f"{'clients':>7} {'aggregate tokens/s':>19} {'vs 1 client':>12} {'max RSS (MiB)':>14}")
        for count in (1, 2, 4, 8):
            rate = run_clients(server.base_url, count)
            single = single or rate
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"{count:>7} {rate:>19,.0f} {rate / single:>11.2f}x {rss:>14,.0f}")
    print(f"(server and clients share this process, pid {os.getpid()}; RSS includes both)")


if __name__ == "__main__":
    main()
