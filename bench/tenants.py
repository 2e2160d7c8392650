"""Many tenants on one base model: 1, 2, 4 and 8 training clients at once, each with its own adapter.

Every client is its own tenant (API key) and process, running a pipelined forward_backward +
optim_step loop on its own LoRA adapter (rank 32) of the built-in model. Two workloads:

- small (the headline, used for the >= 1.5x target): 8 sequences of 11..17 tokens (112 on average)
  per step, the Tinker-style call of the step-latency benchmark. One client is overhead-bound, so
  this is where batching across tenants must pay off;
- large: 8 x 64 tokens per step, where one client already keeps the engine busy.

Reported for each: aggregate training tokens/s, its ratio to one client alone, the server's
resident memory, the cores the server and the clients kept busy, and their CPU time per 1,000
tokens (which a busy machine changes little: two cores divided by it bound a quiet machine's rate).

The server is a `tinkex serve --threads 1` process (on two cores, a second torch thread spins
against the server's own Python; `--threads 0` keeps torch's default), measured twice: with the
engine inside the server process, and with `--workers 1`, the engine in a worker process of its own
(outside the server's GIL). Clients are processes, so their Python is not the server's; on a small
machine they still compete with it for the cores, which the CPU columns show.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/tenants.py [--workers 0] [--workloads small]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import random_batch, serve_process, to_datums

COUNTS = (1, 2, 4, 8)
WORKLOADS = {  # name -> (sequences per step, tokens per sequence)
    "small": (8, 14),  # lengths 11..17, 112 tokens on average
    "large": (8, 64),
}
SECONDS = 4.0  # each client keeps stepping this long
KEYS = [f"tml-bench-tenant-{i:02d}" for i in range(max(COUNTS))]
RANK = 32
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (Linux)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def family(pid: int) -> list[int]:
    """A process and its descendants (the server and its engine workers, if any)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, IndexError):  # gone meanwhile
                pass
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far."""
    total = 0
    for pid in pids:
        try:
            fields = _stat(pid)
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / CLK_TCK


def rss_mib(pids: list[int]) -> tuple[float, float]:
    """(current, peak) resident memory of these processes together, MiB."""
    now = peak = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:  # gone meanwhile
            continue
        status = dict(line.split(":", 1) for line in lines if ":" in line)
        now += int(status["VmRSS"].split()[0])
        peak += int(status["VmHWM"].split()[0])
    return now / 1024, peak / 1024


def client_batch(index: int, workload: str) -> list:
    """Client `index`'s batch: its own random sequences, of lengths spread around the workload's."""
    rows, length = WORKLOADS[workload]
    spread = length // 4 if workload == "small" else 0  # short sequences of different lengths, as chat data
    lengths = np.random.default_rng(index).integers(length - spread, length + spread + 1, rows)
    return [pair for i, n in enumerate(lengths) for pair in random_batch(1, int(n), 2000, seed=1000 * index + i)]


def client(base_url: str, index: int, workload: str, seconds: float, ready, go, results) -> None:
    """One tenant: make an adapter, signal ready, then step until `seconds` after `go`; report tokens."""
    import tinkex
    from tinkex import types

    service = tinkex.ServiceClient(base_url=base_url, api_key=KEYS[index])
    trainer = service.create_lora_training_client(base_model="tinkex/tiny-qwen3", rank=RANK).result()
    batch = client_batch(index, workload)
    datums, tokens = to_datums(types, batch), sum(len(target) for _, target in batch)
    adam = types.AdamParams(learning_rate=1e-4)

    def step() -> None:
        fwd_bwd = trainer.forward_backward(datums, "cross_entropy")  # both in flight together
        optim = trainer.optim_step(adam)
        fwd_bwd.result()
        optim.result()

    step()  # warm: connections open, the adapter's optimizer state exists
    ready.release()
    go.wait()
    start = time.perf_counter()
    steps = 0
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    results.put((steps * tokens, time.perf_counter() - start, cpu_seconds([os.getpid()])))
    service.close()


def run(base_url: str, server_pid: int, count: int, workload: str) -> dict:
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=client, args=(base_url, index, workload, SECONDS, ready, go, results))
             for index in range(count)]
    for proc in procs:
        proc.start()
    for _ in procs:
        if not ready.acquire(timeout=300):  # a client that failed has printed its traceback
            for proc in procs:
                proc.kill()
            raise RuntimeError("a client did not get ready within 300 s")
    server = family(server_pid)
    server_cpu, main_cpu, start = cpu_seconds(server), cpu_seconds([server_pid]), time.perf_counter()
    client_cpu_before = cpu_seconds([p.pid for p in procs])
    go.set()
    reports = [results.get() for _ in procs]
    wall = time.perf_counter() - start
    server_cpu, main_cpu = cpu_seconds(server) - server_cpu, cpu_seconds([server_pid]) - main_cpu
    for proc in procs:
        proc.join()
    tokens = sum(r[0] for r in reports)
    # Each client's time runs from `go` to its last finished step; the aggregate rate is over the slowest.
    elapsed = max(r[1] for r in reports)
    client_cpu = sum(r[2] for r in reports) - client_cpu_before
    return {"rate": tokens / elapsed, "wall": wall, "server_cpu": server_cpu / wall, "client_cpu": client_cpu / wall,
            "worker_cpu": (server_cpu - main_cpu) / wall,
            "server_ms_per_1k": 1e6 * server_cpu / tokens, "client_ms_per_1k": 1e6 * client_cpu / tokens,
            "rss": rss_mib(server)}


def serve_args(threads: int, workers: int) -> list[str]:
    """`tinkex serve` options: these torch threads and engine workers, one key per tenant."""
    args = ["--max-resident-adapters", "100"]
    if threads:
        args += ["--threads", str(threads)]
    if workers:
        args += ["--workers", str(workers)]
    for i, key in enumerate(KEYS):
        args += ["--api-key", f"{key}=tenant-{i}"]
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="the server's torch threads (`tinkex serve --threads`); 0: torch's default, one per core")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1],
                        help="server setups to measure, by engine worker processes (`tinkex serve --workers`); "
                             "0: the engine in the server process")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--counts", nargs="+", type=int, choices=COUNTS, default=list(COUNTS))
    options = parser.parse_args()
    print(f"built-in model, LoRA rank {RANK}, pipelined forward_backward + optim_step, each client its own "
          f"process and tenant, {SECONDS:.0f} s per measurement; `tinkex serve --threads {options.threads or 'default'}`; "
          f"{os.cpu_count()} cores")
    headline = []
    for workers in options.workers:
        setup = f"--workers {workers}: engine in a worker process" if workers else "engine in the server process"
        with tempfile.TemporaryDirectory() as tmp, \
                serve_process(Path(tmp), *serve_args(options.threads, workers)) as (server, base_url):
            run(base_url, server.pid, 1, "small")  # warm-up: the base model loads
            for workload in options.workloads:
                rows, length = WORKLOADS[workload]
                print(f"\n{setup}; {workload}: {rows} x ~{length} tokens per client step")
                print(f"{'clients':>7} {'tokens/s':>9} {'vs 1':>6} {'server RSS MiB':>15} "
                      f"{'server CPU':>11} {'(workers)':>10} {'clients CPU':>12} {'CPU ms/1k tokens: server':>25} "
                      f"{'clients':>8}")
                single = None
                for count in options.counts:
                    r = run(base_url, server.pid, count, workload)
                    single = single or r["rate"]
                    print(f"{count:>7} {r['rate']:>9,.0f} {r['rate'] / single:>5.2f}x {r['rss'][0]:>15,.0f} "
                          f"{r['server_cpu']:>10.2f}c {r['worker_cpu']:>9.2f}c {r['client_cpu']:>11.2f}c "
                          f"{r['server_ms_per_1k']:>25.0f} "
                          f"{r['client_ms_per_1k']:>8.0f}")
                    if count == 4 and workload == "small" and options.counts[0] == 1:
                        headline.append(f"{setup}: {r['rate'] / single:.2f}x")
            print(f"(peak server RSS {rss_mib(family(server.pid))[1]:,.0f} MiB, workers included)")
    print("\nCPU: cores busy on average during the measurement, and CPU time per 1,000 tokens trained (server: "
          "its process and its workers; in brackets, the workers' share). On a busy machine the rates fall but the CPU per token stays about the same: "
          "the cores divided by it bound what a quiet machine can reach.")
    if headline:
        print("4 clients vs 1, small batches (target >= 1.5x): " + "; ".join(headline))


if __name__ == "__main__":
    main()
