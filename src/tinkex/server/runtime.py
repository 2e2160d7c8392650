"""Server settings and the runtime every router shares: store, engine, futures, scheduler, tenants."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from fastapi import HTTPException
from sqlalchemy import select

from tinkex.engine.api import BUILTIN_MODEL, BaseModelInfo, EngineError, SampleJob
from tinkex.types import CheckpointType, ParsedCheckpointTinkerPath
from tinkex.types._rest import SEGMENTS

from .futures import FutureTable
from .scheduler import Scheduler
from .store import CheckpointRow, SamplingSessionRow, SessionRow, Store, TrainingRunRow, utcnow

log = logging.getLogger("tinkex.server")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class ServerSettings:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> tenant name
    base_models: list[str] = field(default_factory=lambda: [BUILTIN_MODEL])
    database_url: str | None = None
    long_poll_seconds: float = 25.0  # under the SDK's 45 s retrieve_future timeout
    max_body_bytes: int = 256 * 1024 * 1024
    compress_forward_backward: bool = False  # ask SDKs to zstd their forward_backward bodies
    torch_threads: int | None = None  # None keeps torch's default (one per core)
    session_timeout_seconds: float = 300.0  # a session without heartbeats this long expires (SDKs beat every 10 s)
    max_resident_adapters: int | None = 64  # beyond it, idle adapters are parked on disk (None: no limit)
    workers: int = 0  # engine worker processes; 0: the engine runs in the server process (the fast default)
    ray_address: str | None = None  # run the workers as Ray actors: "auto", "HOST:PORT", "ray://...", "local"
    worker_gpus: float | None = None  # GPUs per worker; None: one each when there are GPUs, 0: CPU only
    worker_models: list[list[str]] | None = None  # the base models of each worker (sets their number); None: all
    max_queued_requests: int | None = 4096  # unfinished requests at once; beyond it, 429 (None: no limit)
    sampler_backend: str = "torch"  # "vllm": sample with vLLM on a GPU (tinkex.engine.vllm_sampler)
    vllm_engine_args: dict = field(default_factory=dict)  # vLLM EngineArgs, e.g. {"gpu_memory_utilization": 0.5}
    fault_injection: bool = False  # test-only: POST /api/v1/_test/faults


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def not_found(what: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"{what} not found")


def bad_request(detail: str) -> HTTPException:
    return HTTPException(status_code=400, detail=detail)


class Runtime:
    def __init__(self, settings: ServerSettings, engine=None):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self._owned_pool = None  # engine workers this runtime started, stopped with it
        self.store = Store(settings.database_url or f"sqlite:///{settings.data_dir / 'tinkex.db'}")
        lost = self.store.mark_unfinished_lost()
        if lost:
            log.warning("%d requests were in flight when the server last stopped; their futures answer 410", lost)
        if engine is None:
            from tinkex.engine import Engine

            if settings.torch_threads:
                import torch

                torch.set_num_threads(settings.torch_threads)

            if settings.workers or settings.worker_models or settings.ray_address:  # worker processes or actors
                if settings.sampler_backend != "torch":  # the pool does not pass it on to its workers (yet)
                    raise ValueError("--sampler-backend vllm runs in the server process: it does not combine "
                                     "with --workers or --ray-address")
                from tinkex.engine.workers import start_pool

                engine = self._owned_pool = start_pool(
                    settings.base_models, settings.workers, ray_address=settings.ray_address,
                    worker_gpus=settings.worker_gpus, worker_models=settings.worker_models,
                    max_resident_adapters=settings.max_resident_adapters,
                    spill_root=settings.data_dir / "adapter-spill", torch_threads=settings.torch_threads)
            else:
                engine = Engine(settings.base_models, max_resident_adapters=settings.max_resident_adapters,
                                spill_dir=settings.data_dir / "adapter-spill", sampler_backend=settings.sampler_backend,
                                vllm_engine_args=settings.vllm_engine_args)
        self.engine = engine
        self.futures = FutureTable(self.store)
        self.scheduler = Scheduler(engine, self.futures, self._prepare_sample)
        self._tenants = {hash_key(key): tenant for key, tenant in settings.api_keys.items()}
        self._sampler_dirs: dict[str, Path] = {}
        self._touched: dict[str, float] = {}
        self._live_runs: dict[str, TrainingRunRow] = {}  # models opened by this process (rows never change)
        # For the sampling hot path: sampling sessions (rows never change) and the sessions known to be
        # active (a session leaves this set when it finishes or expires, see release_session).
        self._samplers: dict[str, SamplingSessionRow] = {}
        self._active_sessions: set[str] = set()
        self._lock = threading.Lock()
        self.faults: dict[str, list[int]] = {}  # path -> [status, remaining]

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self.futures.close()
        if self._owned_pool is not None:
            self._owned_pool.close()

    # ---- tenants -------------------------------------------------------------------------------

    def tenant_for(self, api_key: str | None) -> str | None:
        return self._tenants.get(hash_key(api_key)) if api_key else None

    def active_session(self, session_id: str, tenant: str) -> SessionRow:
        row = self.store.owned(SessionRow, session_id, tenant)
        if row is None:
            raise not_found(f"session {session_id!r}")
        if row.status != "active":
            raise HTTPException(status_code=410, detail=f"session {session_id!r} has finished ({row.status})")
        return row

    def release_session(self, session_id: str, reason: str) -> None:
        """Free the engine memory a session holds: the adapters of its training runs (their queued
        requests fail with `reason`) and the weights behind its snapshot samplers. Callable from any
        thread and more than once; the engine work itself runs on the engine thread. A finished
        session calls it; so can the expiry of one whose heartbeats stopped."""
        self._active_sessions.discard(session_id)
        for sampler_id, row in list(self._samplers.items()):  # a copy: the event loop may add meanwhile
            if row.session_id == session_id:
                self._samplers.pop(sampler_id, None)
        prefix = f"{session_id}:train:"  # the SDK builds model ids this way, so they name their session
        released = [m for m in self.scheduler.model_ids() if m.startswith(prefix)]
        for model_id in released:
            self._live_runs.pop(model_id, None)
        self.scheduler.release_models(released, reason)
        with self.store.session() as db:
            paths = db.scalars(select(SamplingSessionRow.model_path).where(
                SamplingSessionRow.session_id == session_id, SamplingSessionRow.model_path.like("snapshot:%"))).all()
        if paths:
            self._free_sampler_weights([_sampler_id(path[len("snapshot:"):]) for path in paths])

    def expire_sessions(self) -> list[str]:
        """Expire the active sessions whose heartbeats stopped, freeing their memory (their checkpoints stay)."""
        cutoff = utcnow() - timedelta(seconds=self.settings.session_timeout_seconds)
        with self.store.session() as db:
            stale = db.scalars(select(SessionRow).where(SessionRow.status == "active",
                                                        SessionRow.last_heartbeat < cutoff)).all()
            for row in stale:
                row.status, row.finish_detail = "expired", "no heartbeat"
            expired = [row.id for row in stale]
        for session_id in expired:
            self.release_session(session_id, f"session {session_id} expired: no heartbeat for "
                                              f"{self.settings.session_timeout_seconds:g} s")
        if expired:
            log.info("expired %d sessions without heartbeats", len(expired))
        return expired

    def expire_checkpoints(self) -> list[str]:
        """Delete the checkpoints whose TTL (ttl_seconds at save, or PUT .../ttl) has run out."""
        with self.store.session() as db:
            expired = db.scalars(select(CheckpointRow).where(CheckpointRow.expires_at.is_not(None),
                                                             CheckpointRow.expires_at < utcnow())).all()
            db.expunge_all()
        for row in expired:
            self.delete_checkpoint(row)
        if expired:
            log.info("deleted %d checkpoints whose TTL ran out", len(expired))
        return [row.tinker_path for row in expired]

    # ---- models ---------------------------------------------------------------------------------

    def model_info(self, base_model: str) -> BaseModelInfo:
        try:
            return self.engine.model_info(base_model)
        except EngineError:
            served = ", ".join(info.name for info in self.engine.model_infos())
            raise bad_request(f"unknown base model {base_model!r}; this server serves: {served}") from None

    def training_run(self, model_id: str, tenant: str) -> TrainingRunRow:
        row = self.store.owned(TrainingRunRow, model_id, tenant)
        if row is None:
            raise not_found(f"model {model_id!r}")
        return row

    def open_model(self, row: TrainingRunRow) -> None:
        """Record a new run and give it a request queue; its row is kept for the hot path."""
        self.store.add(row)
        self._live_runs[row.id] = row
        self.scheduler.open_model(row.id)

    def discard_run(self, model_id: str) -> None:
        """Forget a run that never came to be (its weights failed to load)."""
        self._live_runs.pop(model_id, None)
        self.store.delete(TrainingRunRow, model_id)

    def owns_model(self, model_id: str, tenant: str) -> bool:
        """Cheap ownership check for the hot path (models opened by this process)."""
        row = self._live_runs.get(model_id)
        return row is not None and row.tenant == tenant

    def touch_run(self, model_id: str) -> None:
        """Record a run's last request time; at most every few seconds, to keep writes off the hot path."""
        now = time.monotonic()
        if now - self._touched.get(model_id, -1e9) >= 5.0:
            self._touched[model_id] = now
            self.store.update(TrainingRunRow, model_id, last_request_time=utcnow())

    def live_model(self, model_id: str, tenant: str) -> TrainingRunRow:
        """A training run whose weights are loaded in this server process."""
        row = self._live_runs.get(model_id)
        if row is None or row.tenant != tenant:
            row = self.training_run(model_id, tenant)  # 404 for another tenant's
        if not self.scheduler.has_model(model_id):
            raise HTTPException(status_code=404, detail=(
                f"model {model_id!r} is not loaded (the server restarted or it was unloaded); "
                "create a training client from its last checkpoint"))
        return row

    # ---- checkpoints ----------------------------------------------------------------------------

    def checkpoint_name(self, name: str | None) -> str:
        if name is None or not _NAME.match(name):
            raise bad_request(f"checkpoint name {name!r} must be 1-128 characters of letters, digits, '.', '_' "
                              "or '-', starting with a letter or digit")
        return name

    def checkpoint_dir(self, tenant: str, run_id: str, kind: CheckpointType, name: str) -> Path:
        # Names are checked by checkpoint_name and run ids come from the store, so nothing escapes the root.
        root = self.settings.data_dir / "checkpoints" / hash_key(tenant)[:16]
        return root / run_id.replace(":", "_") / SEGMENTS[kind] / name

    def checkpoint(self, tinker_path: str, tenant: str) -> CheckpointRow:
        try:
            ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        row = self.store.get(CheckpointRow, tinker_path)
        if row is None or (row.tenant != tenant and not row.public):
            raise not_found(f"checkpoint {tinker_path!r}")
        return row

    def checkpoint_base_model(self, tinker_path: str, tenant: str) -> str:
        """The base model a checkpoint the tenant may read was trained on."""
        run = self.store.get(TrainingRunRow, self.checkpoint(tinker_path, tenant).training_run_id)
        if run is None:
            raise not_found(f"training run of {tinker_path!r}")
        return run.base_model

    def owned_checkpoint(self, run_id: str, checkpoint_id: str, tenant: str) -> CheckpointRow:
        """A checkpoint addressed REST-style: run id plus "{segment}/{name}"."""
        row = self.store.owned(CheckpointRow, f"tinker://{run_id}/{checkpoint_id}", tenant)
        if row is None:
            raise not_found(f"checkpoint {checkpoint_id!r} of training run {run_id!r}")
        return row

    def delete_checkpoint(self, row: CheckpointRow) -> None:
        """Forget the checkpoint and its files, and free its sampler weights if they were loaded
        (requests still decoding from them fail; later ones get 404)."""
        self.store.delete(CheckpointRow, row.tinker_path)
        self._free_sampler_weights([_sampler_id(row.directory)])
        shutil.rmtree(row.directory, ignore_errors=True)

    # ---- sampling -------------------------------------------------------------------------------

    def sampler(self, sampler_id: str, tenant: str) -> SamplingSessionRow:
        """A sampling session of this tenant whose session is still active (404 / 410 otherwise);
        from memory after its first use."""
        row = self._samplers.get(sampler_id)
        if row is None:
            row = self.store.owned(SamplingSessionRow, sampler_id, tenant)
            if row is None:
                raise not_found(f"sampling session {sampler_id!r}")
            self._samplers[sampler_id] = row
        elif row.tenant != tenant:
            raise not_found(f"sampling session {sampler_id!r}")
        if row.session_id not in self._active_sessions:
            session = self.store.get(SessionRow, row.session_id)
            if session is not None and session.status != "active":
                raise HTTPException(status_code=410, detail=f"session {row.session_id!r} has finished")
            self._active_sessions.add(row.session_id)
        return row

    def sampler_adapter(self, row: SamplingSessionRow) -> str | None:
        """The engine adapter a sampling session samples from (None: the base model)."""
        if row.model_path is None:
            return None
        if row.model_path.startswith("live:"):  # an inflight sampler follows the training adapter
            return row.model_path[len("live:"):]
        if row.model_path.startswith("snapshot:"):  # the unnamed save behind save_weights_and_get_sampling_client
            return self.register_sampler_weights(row.model_path[len("snapshot:"):])
        checkpoint = self.store.get(CheckpointRow, row.model_path)
        if checkpoint is None:
            raise not_found(f"checkpoint {row.model_path!r} of sampler {row.id!r}")
        return self.register_sampler_weights(checkpoint.directory)

    def register_sampler_weights(self, directory: str | Path) -> str:
        adapter_id = _sampler_id(directory)
        with self._lock:
            self._sampler_dirs[adapter_id] = Path(directory)
        return adapter_id

    def _free_sampler_weights(self, adapter_ids: list[str]) -> None:
        """Forget these sampler adapters and free their weights on the engine thread, if loaded
        (requests still decoding from them fail)."""
        with self._lock:
            for adapter_id in adapter_ids:
                self._sampler_dirs.pop(adapter_id, None)

        def free() -> None:
            for adapter_id in adapter_ids:
                if self.engine.has_adapter(adapter_id):
                    self.engine.remove_adapter(adapter_id)

        self.scheduler.call_soon(free)

    def _prepare_sample(self, job: SampleJob) -> None:
        # Runs on the engine thread, just before the batch that needs the weights.
        adapter = job.adapter_id
        if adapter is not None and adapter in self._sampler_dirs and not self.engine.has_adapter(adapter):
            self.engine.load_sampler_weights(adapter, self._sampler_dirs[adapter])


def _sampler_id(directory: str | Path) -> str:
    """The engine adapter that holds the sampler weights saved in this directory."""
    return f"sampler:{directory}"
