"""A bounded load test: 64 concurrent samplers and 4 training clients against one `tinkex serve` for a minute.

Half of each use the official `tinker` SDK, half the tinkex SDK. The server's queue bound is set
below the number of samplers, so backpressure (429 + Retry-After) is part of the run. It promises:
no request fails, the server's resident memory stops growing after warm-up, and it prints p50/p99
latencies. `LOAD_SECONDS=15 pytest tests/server/test_load.py -s` for a shorter local run.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ..conftest import ALICE, BOB, start_server

MODEL = "tinkex/tiny-qwen3"
SECONDS = float(os.environ.get("LOAD_SECONDS", "60"))
SAMPLERS, TRAINERS = 64, 4
QUEUE_BOUND = 32  # below the samplers' concurrency, so the 429 path is part of the run
RSS_GROWTH_LIMIT = 100 * 2**20  # after warm-up, what a leak would exceed within the run


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _batch(types) -> list:
    rows = [[3, 14, 15, 92, 65, 35, 89], [2, 71, 82, 81, 82, 84, 59, 4]]
    return [types.Datum(model_input=types.ModelInput.from_ints(row[:-1]),
                        loss_fn_inputs={"target_tokens": np.array(row[1:], dtype=np.int64),
                                        "weights": np.ones(len(row) - 1, dtype=np.float32)}) for row in rows]


@pytest.mark.slow
def test_64_samplers_and_4_trainers_for_a_minute(tmp_path, hf_home):
    import tinker

    import tinkex

    proc = start_server(tmp_path / "data", "--max-queued-requests", str(QUEUE_BOUND))
    official = tinker.ServiceClient(base_url=proc.base_url, api_key=ALICE)
    ours = tinkex.ServiceClient(base_url=proc.base_url, api_key=BOB)
    clients = [(tinker, official), (tinkex, ours)]
    sample_latency: list[float] = []
    step_latency: list[float] = []
    failures: list[str] = []
    rss: list[tuple[float, int]] = []
    stop = threading.Event()

    def sampler(index: int) -> None:
        sdk, service = clients[index % 2]
        client = service.create_sampling_client(base_model=MODEL)
        client = client.result() if hasattr(client, "result") else client
        params = sdk.types.SamplingParams(max_tokens=8, temperature=1.0, seed=index)
        prompt = sdk.types.ModelInput.from_ints([7, 100 + index, 11, 12])
        while not stop.is_set():
            started = time.monotonic()
            try:
                reply = client.sample(prompt, num_samples=1, sampling_params=params).result(timeout=120)
                assert len(reply.sequences) == 1 and 1 <= len(reply.sequences[0].tokens) <= 8
            except Exception as exc:  # counted, not raised: the test reports every failure at the end
                failures.append(f"sampler {index}: {type(exc).__name__}: {exc}")
                return
            sample_latency.append(time.monotonic() - started)

    def trainer(index: int) -> None:
        sdk, service = clients[index % 2]
        try:
            client = service.create_lora_training_client(base_model=MODEL, rank=8, seed=index).result()
            while not stop.is_set():
                started = time.monotonic()
                fb = client.forward_backward(_batch(sdk.types), "cross_entropy")
                optim = client.optim_step(sdk.types.AdamParams(learning_rate=1e-3))
                assert np.isfinite(fb.result(timeout=120).metrics["loss:sum"])
                optim.result(timeout=120)
                step_latency.append(time.monotonic() - started)
        except Exception as exc:
            failures.append(f"trainer {index}: {type(exc).__name__}: {exc}")

    def watch_memory() -> None:
        while not stop.is_set():
            rss.append((time.monotonic(), _rss(proc.process.pid)))
            stop.wait(0.5)

    threads = [threading.Thread(target=sampler, args=(i,), daemon=True) for i in range(SAMPLERS)]
    threads += [threading.Thread(target=trainer, args=(i,), daemon=True) for i in range(TRAINERS)]
    threads.append(threading.Thread(target=watch_memory, daemon=True))
    try:
        began = time.monotonic()
        for thread in threads:
            thread.start()
        stop.wait(SECONDS)
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
        assert not any(thread.is_alive() for thread in threads), "a client hung"
        counters = httpx.get(proc.base_url + "/metrics", params={"format": "json"}).json()["counters"]
    finally:
        stop.set()
        official.close("success")
        ours.close()
        proc.stop()

    refused = sum(v for k, v in counters.items() if k.startswith("tinkex_server_requests_total") and 'status="429"' in k)
    server_errors = sum(v for k, v in counters.items()
                        if k.startswith("tinkex_server_requests_total") and 'status="5' in k)
    warm = began + SECONDS / 4
    after_warmup = [value for at, value in rss if at >= warm]
    growth = max(after_warmup) - after_warmup[0]
    print(f"\nload: {SECONDS:g} s, {SAMPLERS} samplers, {TRAINERS} trainers, queue bound {QUEUE_BOUND}")
    print(f"  samples: {len(sample_latency)}, p50 {statistics.median(sample_latency) * 1000:.0f} ms, "
          f"p99 {_percentile(sample_latency, 0.99) * 1000:.0f} ms")
    print(f"  training steps (forward_backward + optim_step): {len(step_latency)}, "
          f"p50 {statistics.median(step_latency) * 1000:.0f} ms, p99 {_percentile(step_latency, 0.99) * 1000:.0f} ms")
    print(f"  429 answers: {refused:g}; 5xx answers: {server_errors:g}")
    print(f"  server RSS: {after_warmup[0] / 2**20:.0f} MiB after warm-up, peak {max(v for _, v in rss) / 2**20:.0f} "
          f"MiB, growth after warm-up {growth / 2**20:.1f} MiB (limit {RSS_GROWTH_LIMIT / 2**20:.0f})")
    assert failures == [], failures[:5]
    assert server_errors == 0
    assert len(step_latency) >= TRAINERS and len(sample_latency) >= SAMPLERS
    assert refused > 0, "the queue bound was never reached: the 429 path went untested"
    assert growth < RSS_GROWTH_LIMIT
