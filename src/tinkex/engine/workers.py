"""Engine workers: the engine in other processes (or Ray actors), behind a narrow interface.

A worker holds one `Engine` for the base models it is given and answers a handful of calls on it:
create/remove an adapter, run a forward_backward batch for some adapters, an optimizer step,
save/load adapter state or sampler weights, queue sample requests and step their decoding, stats.
Base-model weights load inside the worker on first use. Locally a worker is a plain process (spawned,
one pipe each); on a cluster it is a Ray actor (ray_workers.py). Both have the same small interface:
`submit(method, *args)` sends a call and returns a reply whose `result()` waits for it, so the pool
can send work to every worker first and then gather.

`WorkerPool` puts the engine's duck-typed interface (what the server calls) on top of N workers:

- an adapter lives on exactly one worker, chosen when it is created or loaded among the live workers
  that hold its base model, least loaded first; every call for it goes there;
- sampling from a bare base model goes to the holder with the fewest requests in flight;
- a forward_backward batch is split by worker and the parts run in parallel; each decode step steps
  every worker that has requests in flight, in parallel;
- model metadata and tokenizers are answered in the server process from the configs alone.

Checkpoint directories are plain paths: every worker must see the same filesystem at the same path
(on one machine the data directory; on a cluster a shared mount).

Streaming callbacks (`SampleJob.on_tokens`) cannot cross a process boundary: a worker records the
token updates of each step and the pool calls the caller's callbacks with them, and it answers with
the caller's own job objects (the scheduler tracks jobs by identity).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .api import EngineError, ForwardBackwardJob, ForwardBackwardResult, LoraSpec, SampleJob
from .served import ServedModels

log = logging.getLogger("tinkex.engine")

# The calls a worker answers: the narrow interface. Everything else (metadata, tokenizers) stays local.
ENGINE_CALLS = frozenset({"create_adapter", "remove_adapter", "run_training", "optim_step", "save_state",
                          "load_state", "save_sampler_weights", "load_sampler_weights", "stats"})
HOST_CALLS = frozenset({"submit_samples", "step_samples"})  # wrapped: keys instead of job objects


class WorkerDied(RuntimeError):
    """An engine worker process or actor is gone; the adapters it held are lost."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker builds its Engine from."""

    base_models: tuple[str, ...]
    device: str | None = None  # None: CUDA when the worker sees a GPU, else CPU
    max_resident_adapters: int | None = None
    spill_dir: Path | None = None  # must be the worker's own: the Engine empties it at start
    torch_threads: int | None = None
    hf_home: Path | None = None


# --- the worker side ----------------------------------------------------------------------------


class EngineHost:
    """Runs inside a worker: an Engine and the calls the pool may make on it.

    `handle` never raises: it answers ("ok", value) or ("error", exception), so a fault in one call
    reaches the pool as that call's error and the worker keeps serving.
    """

    def __init__(self, spec: WorkerSpec):
        import torch

        from .engine import Engine

        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.engine = Engine(spec.base_models, device=spec.device, hf_home=spec.hf_home,
                             max_resident_adapters=spec.max_resident_adapters, spill_dir=spec.spill_dir)
        self._jobs: dict[int, tuple[int, SampleJob]] = {}  # id(job) -> (pool key, job), while the engine has it
        self._streamed: list[tuple[int, int, list[int]]] = []  # (key, sample index, tokens so far) this step

    def handle(self, method: str, args: tuple, kwargs: dict) -> tuple[str, object]:
        try:
            if method in HOST_CALLS:
                return "ok", getattr(self, method)(*args, **kwargs)
            if method in ENGINE_CALLS:
                return "ok", getattr(self.engine, method)(*args, **kwargs)
            raise EngineError(f"engine workers do not answer {method!r}")
        except Exception as exc:
            if not isinstance(exc, EngineError):  # a fault: its traceback stays here, in the worker's log
                log.error("engine worker: %s failed", method, exc_info=exc)
            return "error", portable(exc)

    def submit_samples(self, keyed: list[tuple[int, SampleJob, bool]]) -> list[tuple[int, Exception]]:
        """Queue (key, job, stream) requests; answers the refused ones by key."""
        jobs = []
        for key, job, stream in keyed:
            if stream:
                job.on_tokens = lambda index, tokens, key=key: self._streamed.append((key, index, list(tokens)))
            self._jobs[id(job)] = (key, job)
            jobs.append(job)
        refused = self.engine.submit_samples(jobs)
        return [(self._jobs.pop(id(job))[0], portable(exc)) for job, exc in refused]

    def step_samples(self) -> tuple[list[tuple[int, object]], list[tuple[int, int, list[int]]]]:
        """One decode step: (finished requests by key with their results, token updates of the step)."""
        done = self.engine.step_samples()
        streamed, self._streamed = self._streamed, []
        finished = [(self._jobs.pop(id(job))[0], portable(result) if isinstance(result, Exception) else result)
                    for job, result in done]
        return finished, streamed


def portable(exc: Exception) -> Exception:
    """The exception itself if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# --- workers: what the pool talks to ------------------------------------------------------------


class Reply(Protocol):
    def result(self) -> object:
        """The call's value; raises its error, or WorkerDied."""


class Worker(Protocol):
    name: str

    @property
    def alive(self) -> bool: ...

    def ready(self) -> None:
        """Wait until the worker has built its Engine; raises what stopped it."""

    def submit(self, method: str, *args, **kwargs) -> Reply: ...

    def close(self) -> None: ...


class ProcessWorker:
    """A worker in a spawned local process, over a pipe. Calls may overlap: the worker answers them
    in the order they were sent, and each reply is matched to its call by that order."""

    def __init__(self, name: str, spec: WorkerSpec, *, cuda_visible_devices: str | None = None):
        context = multiprocessing.get_context("spawn")  # never fork a process that has torch threads
        self.name = name
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_process_main, args=(child, spec, cuda_visible_devices),
                                        name=f"tinkex-{name}", daemon=True)
        self._process.start()
        child.close()  # so that the worker's death reads as end-of-file here
        self._send_lock = threading.Lock()  # one message on the pipe at a time; numbers the calls
        self._receive_lock = threading.Lock()  # one reader at a time; replies are read in call order
        self._sent = self._read = 0  # calls sent and replies read so far
        self._replies: dict[int, tuple[str, object]] = {}  # read, for calls whose caller has not asked yet
        self._died: str | None = None
        self._started = False

    @property
    def alive(self) -> bool:
        return self._died is None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def ready(self) -> None:
        if self._started:  # without the lock: a reader may hold it, waiting for an earlier call's reply
            return
        with self._receive_lock:
            if not self._started:
                try:
                    self._unwrap(self._receive("starting"))
                except Exception as exc:  # it could not build its Engine, and has exited
                    self._died = self._died or f"engine worker {self.name} could not start: {exc}"
                    raise
                self._started = True

    def submit(self, method: str, *args, **kwargs) -> _PipeReply:
        self.ready()
        with self._send_lock:
            if self._died is not None:
                raise WorkerDied(self._died)
            try:
                self._conn.send((method, args, kwargs))
            except (OSError, ValueError):
                raise self._death(f"running {method}") from None
            call, self._sent = self._sent, self._sent + 1
        return _PipeReply(self, call, f"running {method}")

    def reply(self, call: int, doing: str) -> object:
        """The answer to call number `call`, reading (and keeping) the replies to earlier calls first."""
        with self._receive_lock:
            while call not in self._replies:
                self._replies[self._read] = self._receive(doing)
                self._read += 1
            return self._unwrap(self._replies.pop(call))

    def _receive(self, doing: str) -> tuple[str, object]:
        if self._died is not None:
            raise WorkerDied(self._died)
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise self._death(doing) from None

    @staticmethod
    def _unwrap(answer: tuple[str, object]) -> object:
        status, value = answer
        if status == "error":
            raise value
        return value

    def _death(self, doing: str) -> WorkerDied:
        self._process.join(timeout=5)
        code = self._process.exitcode
        how = f"exit code {code}" if code is not None and code >= 0 else f"signal {-code}" if code else "no answer"
        self._died = (f"engine worker {self.name} (pid {self._process.pid}) died ({how}) while {doing}; "
                      "the adapters it held are lost: load them again from a checkpoint")
        return WorkerDied(self._died)

    def close(self) -> None:
        self._died = self._died or f"engine worker {self.name} was closed"
        self._conn.close()  # the worker reads end-of-file and returns
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=10)


class _PipeReply:
    def __init__(self, worker: ProcessWorker, call: int, doing: str):
        self._worker, self._call, self._doing = worker, call, doing
        self._done, self._value, self._error = False, None, None

    def result(self) -> object:
        if not self._done:
            try:
                self._value = self._worker.reply(self._call, self._doing)
            except Exception as exc:
                self._error = exc
            self._done = True
        if self._error is not None:
            raise self._error
        return self._value


def _process_main(conn, spec: WorkerSpec, cuda_visible_devices: str | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's: it closes the pipe to stop us
    if cuda_visible_devices is not None:  # before torch is imported
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    try:
        host = EngineHost(spec)
    except Exception as exc:
        conn.send(("error", portable(exc)))
        return
    conn.send(("ok", None))
    while True:
        try:
            method, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(host.handle(method, args, kwargs))


# --- the pool: the engine interface over workers --------------------------------------------------


@dataclass
class _InFlight:
    job: SampleJob  # the caller's own object
    worker: int
    error: Exception | None = None  # its streaming listener failed: the request fails when it ends


class WorkerPool(ServedModels):
    """The engine's interface over engine workers (see the module docstring). Called from the
    scheduler's one engine thread; `stats` and the metadata calls may come from other threads."""

    def __init__(self, workers: Sequence[Worker], base_models: Sequence[str], *,
                 holds: Sequence[Sequence[str]] | None = None, hf_home: Path | None = None):
        """`holds[i]`: the base models worker i serves (default: all of them, loaded on first use)."""
        import torch

        from . import builtin, models

        cache_dir = builtin.hub_cache_dir(hf_home)
        # Only the configs are read here; the weights load in the workers.
        self._bases = {name: models.BaseModel(name, models.resolve(name, cache_dir), torch.device("cpu"))
                       for name in dict.fromkeys(base_models)}
        self._workers = list(workers)
        self._holds = [set(h) for h in holds] if holds is not None else [set(self._bases)] * len(self._workers)
        if len(self._holds) != len(self._workers) or not self._workers:
            raise ValueError("a worker pool needs at least one worker, and one set of base models per worker")
        self._placement: dict[str, int] = {}  # adapter id -> worker index
        self._in_flight: dict[int, _InFlight] = {}  # sample key -> request
        self._keys = itertools.count()
        for worker in self._workers:
            worker.ready()

    def close(self) -> None:
        for worker in self._workers:
            worker.close()

    # --- placement --------------------------------------------------------------------------

    @property
    def workers(self) -> list[Worker]:
        return list(self._workers)

    def placement(self) -> dict[str, str]:
        """{adapter id: worker name}: where each adapter lives."""
        return {adapter_id: self._workers[i].name for adapter_id, i in self._placement.items()}

    def _holders(self, base_model: str | None) -> list[int]:
        """The live workers that serve this base model (None: any), or all that serve it if none is live."""
        serving = [i for i, held in enumerate(self._holds) if base_model is None or base_model in held]
        return [i for i in serving if self._workers[i].alive] or serving

    def _least_loaded(self, base_model: str | None) -> int:
        holders = self._holders(base_model)
        if not holders:
            raise EngineError(f"no engine worker serves base model {base_model!r}")
        adapters = [0] * len(self._workers)
        for i in self._placement.values():
            adapters[i] += 1
        return min(holders, key=lambda i: adapters[i])

    def _worker_of(self, adapter_id: str) -> Worker:
        try:
            return self._workers[self._placement[adapter_id]]
        except KeyError:
            raise EngineError(f"unknown adapter {adapter_id!r}") from None

    def _check_new(self, adapter_id: str) -> None:
        if adapter_id in self._placement:
            raise EngineError(f"adapter {adapter_id!r} already exists")

    def _served_base_of_checkpoint(self, directory: Path) -> str | None:
        """The served base model a checkpoint was made on (by name, or by directory as peft records it)."""
        from .checkpoint import base_model_of

        name = base_model_of(Path(directory))
        if name in self._bases:
            return name
        try:
            path = Path(name).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        return next((b.name for b in self._bases.values() if b.directory.resolve() == path), None)

    def _place_and_call(self, adapter_id: str, worker: int, method: str, *args, **kwargs):
        result = self._workers[worker].submit(method, adapter_id, *args, **kwargs).result()
        self._placement[adapter_id] = worker
        return result

    # --- adapters and training --------------------------------------------------------------

    def create_adapter(self, adapter_id: str, base_model: str, spec: LoraSpec) -> None:
        self._base(base_model)
        self._check_new(adapter_id)
        self._place_and_call(adapter_id, self._least_loaded(base_model), "create_adapter", base_model, spec)

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self._placement

    def adapter_ids(self) -> list[str]:
        return list(self._placement)

    def remove_adapter(self, adapter_id: str) -> None:
        worker = self._worker_of(adapter_id)
        try:
            worker.submit("remove_adapter", adapter_id).result()
        except WorkerDied:
            pass  # its adapters went with it
        finally:
            self._placement.pop(adapter_id, None)

    def forward_backward(self, jobs: list[ForwardBackwardJob]) -> list[ForwardBackwardResult | Exception]:
        return self.run_training(jobs, [])[0]

    def optim_step(self, adapter_id: str, hyper) -> dict[str, float]:
        return self._worker_of(adapter_id).submit("optim_step", adapter_id, hyper).result()

    def optim_steps(self, steps: list[tuple[str, object]]) -> list[dict[str, float] | Exception]:
        return self.run_training([], steps)[1]

    def run_training(self, jobs: list[ForwardBackwardJob], steps: list[tuple[str, object]]
                     ) -> tuple[list[ForwardBackwardResult | Exception], list[dict[str, float] | Exception]]:
        return self.submit_training(jobs, steps).result()

    def submit_training(self, jobs: list[ForwardBackwardJob], steps: list[tuple[str, object]]) -> _Gathered:
        """Split the jobs and the (adapter id, hyperparameters) steps by worker and send each worker
        its part, one call each; the reply's result() waits for them: (forward_backward results, step
        metrics) in the caller's order (an unknown adapter's an EngineError, the answers of a worker's
        part that failed as a whole its exception). The scheduler sends a turn while the last runs."""
        owners = [job.adapter_id for job in jobs] + [adapter_id for adapter_id, _ in steps]
        answers: list = [None] * len(owners)
        parts: dict[int, list[int]] = {}
        for i, adapter_id in enumerate(owners):
            if adapter_id in self._placement:
                parts.setdefault(self._placement[adapter_id], []).append(i)
            else:
                answers[i] = EngineError(f"unknown adapter {adapter_id!r}")
        n = len(jobs)
        sent = self._send({worker: ("run_training", [jobs[i] for i in indices if i < n],
                                    [steps[i - n] for i in indices if i >= n])
                           for worker, indices in parts.items()}, parts.values())

        def gather() -> tuple[list, list]:
            for indices, outcome in self._gather(sent):
                flat = [outcome] * len(indices) if isinstance(outcome, Exception) else [*outcome[0], *outcome[1]]
                for i, result in zip(indices, flat, strict=True):  # a part's indices ascend: jobs, then steps
                    answers[i] = result
            return answers[:n], answers[n:]

        return _Gathered(gather)

    def save_state(self, adapter_id: str, directory: Path, *, optimizer: bool) -> int:
        worker = self._worker_of(adapter_id)
        return worker.submit("save_state", adapter_id, Path(directory), optimizer=optimizer).result()

    def load_state(self, adapter_id: str, directory: Path, *, optimizer: bool) -> tuple[str, LoraSpec]:
        self._check_new(adapter_id)
        worker = self._least_loaded(self._served_base_of_checkpoint(directory))  # None: the engine explains
        return self._place_and_call(adapter_id, worker, "load_state", Path(directory), optimizer=optimizer)

    def save_sampler_weights(self, adapter_id: str, directory: Path) -> int:
        return self._worker_of(adapter_id).submit("save_sampler_weights", adapter_id, Path(directory)).result()

    def load_sampler_weights(self, adapter_id: str, directory: Path) -> str:
        self._check_new(adapter_id)
        worker = self._least_loaded(self._served_base_of_checkpoint(directory))
        return self._place_and_call(adapter_id, worker, "load_sampler_weights", Path(directory))

    # --- sampling ---------------------------------------------------------------------------

    def submit_samples(self, jobs: list[SampleJob]) -> list[tuple[SampleJob, Exception]]:
        refused: list[tuple[SampleJob, Exception]] = []
        parts: dict[int, list[tuple[int, SampleJob, bool]]] = {}
        for job in jobs:
            try:
                worker = self._sampling_worker(job)
            except EngineError as exc:
                refused.append((job, exc))
                continue
            key = next(self._keys)
            self._in_flight[key] = _InFlight(job, worker)
            parts.setdefault(worker, []).append(
                (key, dataclasses.replace(job, on_tokens=None), job.on_tokens is not None))
        for keyed, outcome in self._scatter({w: ("submit_samples", keyed) for w, keyed in parts.items()},
                                            parts.values()):
            answers = outcome if isinstance(outcome, list) else [(key, outcome) for key, _, _ in keyed]
            refused += [(self._in_flight.pop(key).job, exc) for key, exc in answers]
        return refused

    def _sampling_worker(self, job: SampleJob) -> int:
        self._base(job.base_model)
        if job.adapter_id is not None:
            if job.adapter_id not in self._placement:
                raise EngineError(f"unknown adapter {job.adapter_id!r}")
            return self._placement[job.adapter_id]
        holders = self._holders(job.base_model)
        if not holders:
            raise EngineError(f"no engine worker serves base model {job.base_model!r}")
        busy = [0] * len(self._workers)
        for request in self._in_flight.values():
            busy[request.worker] += 1
        return min(holders, key=lambda i: busy[i])

    def step_samples(self) -> list[tuple[SampleJob, object]]:
        """One decode step on every worker with requests in flight; the caller's jobs that finished."""
        stepping = sorted({request.worker for request in self._in_flight.values()})
        done: list[tuple[SampleJob, object]] = []
        for worker, outcome in self._scatter({w: ("step_samples",) for w in stepping}, stepping):
            if isinstance(outcome, Exception):  # the worker failed or died: so did its requests
                finished = [(key, outcome) for key, r in self._in_flight.items() if r.worker == worker]
                streamed = []
            else:
                finished, streamed = outcome
            for key, index, tokens in streamed:
                request = self._in_flight.get(key)  # None: failed already (its worker's step raised)
                if request is not None and request.error is None:
                    try:
                        request.job.on_tokens(index, tokens)
                    except Exception as exc:  # a broken listener fails its own request only
                        request.error = exc
            for key, result in finished:
                request = self._in_flight.pop(key, None)
                if request is not None:
                    done.append((request.job, request.error or result))
        return done

    @property
    def sampling(self) -> bool:
        return bool(self._in_flight)

    # --- observability ----------------------------------------------------------------------

    def stats(self) -> dict:
        """The engine's counts summed over the workers, and each worker's own under "workers"."""
        per_worker = {}
        for worker in self._workers:  # one at a time: safe beside the engine thread's fan-outs
            try:
                per_worker[worker.name] = worker.submit("stats").result()
            except Exception as exc:
                per_worker[worker.name] = {"error": str(exc)}
        merged: dict = {}
        for counts in per_worker.values():
            if "error" not in counts:
                merged = _add(merged, counts)
        return {**merged, "workers": per_worker}

    # --- fan out and gather -----------------------------------------------------------------

    def _scatter(self, calls: dict[int, tuple], labels):
        """Send each worker its call, then gather: yields (label, value or the exception it raised)."""
        return self._gather(self._send(calls, labels))

    def _send(self, calls: dict[int, tuple], labels) -> list[tuple[object, Reply | Exception]]:
        replies = []
        for (worker, (method, *args)), label in zip(calls.items(), labels, strict=True):
            try:
                replies.append((label, self._workers[worker].submit(method, *args)))
            except Exception as exc:
                replies.append((label, exc))
        return replies

    @staticmethod
    def _gather(replies: list[tuple[object, Reply | Exception]]):
        for label, reply in replies:
            if isinstance(reply, Exception):
                yield label, reply
                continue
            try:
                yield label, reply.result()
            except Exception as exc:
                yield label, exc


class _Gathered:
    """A worker pool's answer to come: result() gathers it from the workers (once)."""

    def __init__(self, gather):
        self._gather, self._value = gather, None

    def result(self):
        if self._gather is not None:
            self._value, self._gather = self._gather(), None
        return self._value


def _add(a, b):
    """Counts added leaf by leaf (flags or-ed): stats of several engines as one."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {key: _add(a[key], b[key]) if key in a else b[key] for key in b} | \
               {key: value for key, value in a.items() if key not in b}
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) or bool(b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a + b
    return b if a is None else a


# --- building a pool ------------------------------------------------------------------------------


def start_pool(base_models: Sequence[str], workers: int, *, ray_address: str | None = None,
               worker_gpus: float | None = None, worker_models: Sequence[Sequence[str]] | None = None,
               max_resident_adapters: int | None = None, spill_root: Path | None = None,
               torch_threads: int | None = None, hf_home: Path | None = None) -> WorkerPool:
    """Start `workers` engine workers serving `base_models` and a pool over them.

    Local processes unless `ray_address` is given (then Ray actors; 0 workers means one per GPU of
    the cluster, or one). `worker_gpus`: GPUs per worker; None gives each worker a GPU when there are
    any (local workers take them round-robin), 0 keeps the workers on CPU. `worker_models[i]`: the
    base models worker i serves (default: every worker serves all); when given, it sets the number
    of workers."""
    base_models = tuple(dict.fromkeys(base_models))
    holds = [tuple(dict.fromkeys(models)) for models in worker_models] if worker_models else None
    if holds is not None:
        unknown = sorted({m for models in holds for m in models} - set(base_models))
        if unknown:
            raise ValueError(f"engine workers given base models the server does not serve: {', '.join(unknown)} "
                             f"(served: {', '.join(base_models)})")
        if not all(holds):
            raise ValueError("every engine worker must serve at least one base model")
        workers = len(holds)

    def spec(i: int, device: str | None, threads: int | None) -> WorkerSpec:
        spill = spill_root / f"worker-{i}" if spill_root is not None else None
        return WorkerSpec(holds[i] if holds else base_models, device, max_resident_adapters, spill, threads, hf_home)

    if ray_address is not None:
        from .ray_workers import start_ray_workers

        started = start_ray_workers(ray_address, workers, worker_gpus,
                                    lambda i, device: spec(i, device, torch_threads))
    else:
        if workers < 1:
            raise ValueError("local engine workers: give at least one (0 means the in-process engine)")
        gpus = _local_gpu_count() if worker_gpus != 0 else 0
        if worker_gpus and not gpus:
            raise ValueError(f"--worker-gpus {worker_gpus:g} asked for GPUs, but this machine has none")
        threads = torch_threads or max(1, (os.cpu_count() or 1) // workers)  # share the cores
        started = [ProcessWorker(f"worker-{i}", spec(i, None if gpus else "cpu", threads),
                                 cuda_visible_devices=str(i % gpus) if gpus else "")
                   for i in range(workers)]
    try:
        return WorkerPool(started, base_models, holds=holds, hf_home=hf_home)
    except BaseException:
        for worker in started:
            worker.close()
        raise


def _local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()
