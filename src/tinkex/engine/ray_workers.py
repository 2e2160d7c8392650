"""Engine workers as Ray actors: one actor per worker, placed by Ray (one per GPU when they ask for one).

The actor wraps the same EngineHost a local worker process runs, so a Ray worker answers exactly the
calls a process worker does, in the order they were sent (one call at a time per actor). Ray is
optional: it is imported only here, on first use, and `pip install 'tinkex[ray]'` brings it.

Every node must have tinkex (with its server extra) installed, the base models at the same paths or
in its Hugging Face cache, and the server's data directory mounted at the same path: checkpoints are
written and read by the workers as plain files.
"""

from __future__ import annotations

from collections.abc import Callable

from .workers import EngineHost, WorkerDied, WorkerSpec


def _ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError("engine workers on Ray need Ray installed: pip install 'tinkex[ray]'") from None
    return ray


def connect(address: str) -> None:
    """Join the Ray cluster at `address` ("auto", "HOST:PORT" or "ray://HOST:PORT"), or start a
    private one on this machine ("local"). Does nothing if this process is connected already."""
    ray = _ray()
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
    else:
        ray.init(address=address)


class EngineActor:
    """The actor: an Engine behind EngineHost.handle."""

    def __init__(self, spec: WorkerSpec):
        self._host = EngineHost(spec)

    def ready(self) -> tuple[str, object]:
        return "ok", None  # answered once the constructor has built the Engine

    def handle(self, method: str, args: tuple, kwargs: dict) -> tuple[str, object]:
        return self._host.handle(method, args, kwargs)


class RayWorker:
    """A worker that is a Ray actor; the same interface as workers.ProcessWorker."""

    def __init__(self, name: str, spec: WorkerSpec, *, num_cpus: float, num_gpus: float):
        ray = _ray()
        self.name = name
        self._died: str | None = None
        actor = ray.remote(EngineActor).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_concurrency=1,
            scheduling_strategy="SPREAD")  # spread over the nodes rather than filling one first
        self._actor = actor.remote(spec)

    @property
    def alive(self) -> bool:
        return self._died is None

    def ready(self) -> None:
        _RayReply(self, "starting", self._actor.ready.remote()).result()

    def submit(self, method: str, *args, **kwargs) -> _RayReply:
        if self._died is not None:
            raise WorkerDied(self._died)
        return _RayReply(self, f"running {method}", self._actor.handle.remote(method, args, kwargs))

    def close(self) -> None:
        ray = _ray()
        if ray.is_initialized():  # else the actor went with the cluster connection
            ray.kill(self._actor)
        self._died = self._died or f"engine worker {self.name} was closed"


class _RayReply:
    def __init__(self, worker: RayWorker, doing: str, ref):
        self._worker, self._doing, self._ref = worker, doing, ref

    def result(self) -> object:
        ray = _ray()
        try:
            answer = ray.get(self._ref)
        except ray.exceptions.RayActorError as exc:
            self._worker._died = (f"engine worker {self._worker.name} (a Ray actor) died while "
                                  f"{self._doing}; the adapters it held are lost: {exc}")
            raise WorkerDied(self._worker._died) from None
        status, value = answer
        if status == "error":
            raise value
        return value


def start_ray_workers(address: str, workers: int, worker_gpus: float | None,
                      spec: Callable[[int, str | None], WorkerSpec]) -> list[RayWorker]:
    """Connect to Ray and start the actors. `workers` 0: one per GPU in the cluster (at least one).
    `worker_gpus` None: one GPU per worker when the cluster has GPUs, else none."""
    connect(address)
    cluster_gpus = int(_ray().cluster_resources().get("GPU", 0))
    if worker_gpus is None:
        worker_gpus = 1 if cluster_gpus else 0
    if workers < 1:
        workers = max(1, int(cluster_gpus // worker_gpus) if worker_gpus else 1)
    device = None if worker_gpus else "cpu"  # a CPU worker never touches a GPU its node may have
    return [RayWorker(f"ray-worker-{i}", spec(i, device), num_cpus=1, num_gpus=worker_gpus)
            for i in range(workers)]
