"""Checkpoints of a run, recorded in `log_dir/checkpoints.jsonl`, and resuming from the last one.

Each record: {"name": "000020", "step": 20, "state_path": "tinker://...", "sampler_path": ...,
plus whatever loop state the caller adds}. `step` is the number of optimizer steps done, so a
resumed loop starts at that step.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from .sdk import default_service_client, resolved, types_for

CHECKPOINTS_FILE = "checkpoints.jsonl"


def save_checkpoint(training_client: Any, log_dir: str | Path, step: int, *, name: str | None = None,
                    kind: Literal["state", "sampler", "both"] = "state", **loop_state: Any) -> dict[str, Any]:
    """Save the training state (weights + optimizer) and/or sampler weights and record them."""
    name = name or f"{step:06d}"
    record: dict[str, Any] = {"name": name, "step": step, **loop_state}
    state_future = training_client.save_state(name) if kind in ("state", "both") else None
    sampler_future = training_client.save_weights_for_sampler(name) if kind in ("sampler", "both") else None
    if state_future is not None:
        record["state_path"] = resolved(state_future).path
    if sampler_future is not None:
        record["sampler_path"] = resolved(sampler_future).path
    path = Path(log_dir) / CHECKPOINTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    return record


def load_checkpoints(log_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(log_dir) / CHECKPOINTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def get_last_checkpoint(log_dir: str | Path, required_key: str = "state_path") -> dict[str, Any] | None:
    """The newest record that has `required_key`, or None."""
    for record in reversed(load_checkpoints(log_dir)):
        if record.get(required_key):
            return record
    return None


def create_or_resume_training_client(service_client: Any, log_dir: str | Path, *, model_name: str, rank: int,
                                     seed: int | None = None, resume: bool = True,
                                     load_checkpoint_path: str | None = None) -> tuple[Any, int]:
    """(training client, first step). Resumes weights *and* optimizer from the last checkpoint of
    `log_dir` when there is one (and `resume`); else loads weights from `load_checkpoint_path`
    with a fresh optimizer; else creates a fresh LoRA adapter."""
    last = get_last_checkpoint(log_dir) if resume else None
    if last is not None:
        client = resolved(service_client.create_training_client_from_state_with_optimizer(last["state_path"]))
        return client, int(last["step"])
    if load_checkpoint_path:
        return resolved(service_client.create_training_client_from_state(load_checkpoint_path)), 0
    return resolved(service_client.create_lora_training_client(base_model=model_name, rank=rank, seed=seed)), 0


def start_run(config: Any, service_client: Any = None) -> tuple[Any, ModuleType, Path, Any, int]:
    """The start every loop shares: (service client, its types module, the log dir holding
    config.json, the training client, the first step). `config` is a loop's config dataclass."""
    service_client = service_client if service_client is not None else default_service_client()
    log_dir = Path(config.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    training_client, start_step = create_or_resume_training_client(
        service_client, log_dir, model_name=config.model_name, rank=config.lora_rank, seed=config.seed,
        resume=config.resume, load_checkpoint_path=config.load_checkpoint_path)
    return service_client, types_for(service_client), log_dir, training_client, start_step
