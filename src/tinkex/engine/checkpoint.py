"""Adapter checkpoints on disk, in peft's format so that they load anywhere peft does.

A directory holds:
    adapter_model.safetensors  LoRA weights under peft's names
                               (base_model.model.<module path>.lora_A.weight / .lora_B.weight)
    adapter_config.json        peft's LoraConfig (r, lora_alpha, target_modules, ...)
    optimizer.safetensors      save_state(optimizer=True) only: Adam moments, keyed like the
                               weights plus .exp_avg / .exp_avg_sq, and the step count
    tinkex_state.json          base model, LoRA spec, kind ("state" or "sampler"), and the size and
                               SHA-256 of every file above, to catch truncated or corrupt copies

Directories are written under a temporary name and renamed into place, so a reader never sees a
half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import lora
from .api import EngineError, LoraSpec

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "tinkex_state.json"
STEP_KEY = "step"
FORMAT_VERSION = 1


def peft_key(path: str, which: str) -> str:
    return f"base_model.model.{path}.lora_{which}.weight"


@dataclass
class Checkpoint:
    base_model: str
    spec: LoraSpec
    scale: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A, B)
    moments: list[dict[str, torch.Tensor]] | None = None  # per parameter, in weights order (A, B, A, B...)
    step: int = 0


def save(directory: Path, ckpt: Checkpoint, *, kind: str, with_optimizer: bool) -> int:
    """Write a checkpoint directory atomically; return the bytes written."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        tensors = {}
        for path, (a, b) in ckpt.weights.items():
            tensors[peft_key(path, "A")] = a.detach().cpu().contiguous()
            tensors[peft_key(path, "B")] = b.detach().cpu().contiguous()
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        _write_json(tmp / CONFIG_FILE, _peft_config(ckpt))
        if with_optimizer:
            save_file(_optimizer_tensors(ckpt), tmp / OPTIMIZER_FILE, metadata={"format": "pt"})
        files = [WEIGHTS_FILE, CONFIG_FILE] + ([OPTIMIZER_FILE] if with_optimizer else [])
        _write_json(tmp / STATE_FILE, {
            "format": "tinkex-lora", "version": FORMAT_VERSION, "kind": kind,
            "base_model": ckpt.base_model, "spec": asdict(ckpt.spec), "lora_alpha": ckpt.scale * ckpt.spec.rank,
            "step": ckpt.step,
            "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in files},
        })
        written = sum(f.stat().st_size for f in tmp.iterdir())
        _replace_dir(tmp, directory)
        return written
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _optimizer_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    tensors = {STEP_KEY: torch.tensor([ckpt.step], dtype=torch.int64)}
    if ckpt.moments is None:
        return tensors
    names = [peft_key(path, which) for path in ckpt.weights for which in ("A", "B")]
    for name, state in zip(names, ckpt.moments, strict=True):
        for key, value in state.items():
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
    return tensors


def _peft_config(ckpt: Checkpoint) -> dict:
    targets = sorted({path.rsplit(".", 1)[-1] for path in ckpt.weights})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": ckpt.base_model,
        "r": ckpt.spec.rank, "lora_alpha": ckpt.scale * ckpt.spec.rank, "target_modules": targets,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "revision": None,
    }


def _replace_dir(tmp: Path, directory: Path) -> None:
    if directory.exists():  # overwrite: move the old one aside first (rename cannot replace a full dir)
        old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex}"
        os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, directory)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- reading ------------------------------------------------------------------------------------


def load(directory: Path, shapes: dict[str, tuple[int, int]] | None = None, *, kind: str | None,
         with_optimizer: bool) -> Checkpoint:
    """Read and verify a checkpoint directory.

    kind="state" demands a save_state directory; kind=None also takes a sampler-weights directory
    or a plain peft adapter directory (no tinkex_state.json). `shapes` ({module path: (in, out)}
    of the base model), when given, is checked against every tensor."""
    directory = Path(directory)

    def fail(why: str) -> EngineError:
        return EngineError(f"checkpoint {directory}: {why}")

    if not directory.is_dir():
        raise fail("no such directory")
    state = _read_json(directory / STATE_FILE, fail) if (directory / STATE_FILE).exists() else None
    if state is None:
        if kind == "state":
            raise fail(f"missing {STATE_FILE} (not a save_state checkpoint)")
        return _load_plain_peft(directory, shapes, fail)
    if kind is not None and state.get("kind") != kind:
        raise fail(f"is a {state.get('kind')!r} checkpoint, not a {kind!r} one")
    if with_optimizer and OPTIMIZER_FILE not in state.get("files", {}):
        raise fail("was saved without optimizer state")
    for name, expected in state.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise fail(f"missing {name}")
        if path.stat().st_size != expected["bytes"]:
            raise fail(f"{name} has {path.stat().st_size} bytes, expected {expected['bytes']} (truncated?)")
        if _sha256(path) != expected["sha256"]:
            raise fail(f"{name} is corrupt (checksum mismatch)")
    try:
        spec = LoraSpec(**state["spec"])
        base_model = state["base_model"]
        alpha = float(state["lora_alpha"])
        step = int(state.get("step", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise fail(f"{STATE_FILE} is malformed: {exc}") from None
    weights = _read_weights(directory, spec, shapes, fail)
    ckpt = Checkpoint(base_model, spec, alpha / spec.rank, weights, step=step)
    if with_optimizer:
        ckpt.moments, ckpt.step = _read_optimizer(directory, weights, fail)
    return ckpt


def base_model_of(directory: Path) -> str:
    """The base model a checkpoint directory was made on, from its JSON alone."""
    directory = Path(directory)

    def fail(why: str) -> EngineError:
        return EngineError(f"checkpoint {directory}: {why}")

    if not directory.is_dir():
        raise fail("no such directory")
    if (directory / STATE_FILE).exists():
        name = _read_json(directory / STATE_FILE, fail).get("base_model")
    else:
        name = _read_json(directory / CONFIG_FILE, fail).get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        raise fail("does not say which base model it was made on")
    return name


def _load_plain_peft(directory: Path, shapes, fail) -> Checkpoint:
    config = _read_json(directory / CONFIG_FILE, fail)
    try:
        rank, alpha, base_model = int(config["r"]), float(config["lora_alpha"]), config["base_model_name_or_path"]
        targets = set(config["target_modules"])
    except (KeyError, TypeError, ValueError) as exc:
        raise fail(f"{CONFIG_FILE} is not a peft LoRA config: {exc}") from None
    if config.get("use_dora") or config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise fail("uses peft features tinkex does not load (DoRA, rsLoRA or per-module ranks)")
    spec = LoraSpec(rank=rank, train_attn=bool(targets & set(lora.ATTN_MODULES)),
                    train_mlp=bool(targets & set(lora.MLP_MODULES)), train_unembed=lora.UNEMBED_MODULE in targets)
    return Checkpoint(base_model, spec, alpha / rank, _read_weights(directory, spec, shapes, fail))


def _read_json(path: Path, fail) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise fail(f"missing {path.name}") from None
    except (OSError, ValueError) as exc:
        raise fail(f"{path.name} is unreadable: {exc}") from None


def _read_tensors(path: Path, fail) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise fail(f"missing {path.name}")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error type for bad headers and sizes
        raise fail(f"{path.name} is unreadable: {exc}") from None


def _read_weights(directory: Path, spec: LoraSpec, shapes, fail) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    tensors = _read_tensors(directory / WEIGHTS_FILE, fail)
    suffix = ".lora_A.weight"
    paths = [key[len("base_model.model."):-len(suffix)] for key in tensors if key.endswith(suffix)]
    if shapes is not None:
        unknown = sorted(set(paths) - set(shapes))
        if unknown:
            raise fail(f"{WEIGHTS_FILE} adapts {unknown[0]}, which this base model has no LoRA target for")
        paths = [p for p in shapes if p in set(paths)]  # model order, as the optimizer state is laid out
    weights = {}
    for path in paths:
        a, b = tensors.get(peft_key(path, "A")), tensors.get(peft_key(path, "B"))
        if a is None or b is None:
            raise fail(f"{WEIGHTS_FILE} has no LoRA weights for {path}")
        if shapes is not None:
            expect_a, expect_b = (spec.rank, shapes[path][0]), (shapes[path][1], spec.rank)
            if tuple(a.shape) != expect_a or tuple(b.shape) != expect_b:
                raise fail(f"{path}: LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit this base model "
                           f"(expected {expect_a}, {expect_b})")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise fail(f"{path}: LoRA weights contain NaN or infinity")
        weights[path] = (a.float(), b.float())
    if not weights:
        raise fail(f"{WEIGHTS_FILE} holds no LoRA weights")
    return weights


def _read_optimizer(directory: Path, weights, fail) -> tuple[list[dict[str, torch.Tensor]], int]:
    tensors = _read_tensors(directory / OPTIMIZER_FILE, fail)
    if STEP_KEY not in tensors:
        raise fail(f"{OPTIMIZER_FILE} has no step count")
    step = int(tensors[STEP_KEY].reshape(-1)[0])
    moments = []
    for path, pair in weights.items():
        for which, param in zip("AB", pair):
            name = peft_key(path, which)
            state = {key: tensors.get(f"{name}.{key}") for key in ("exp_avg", "exp_avg_sq")}
            if step > 0 and any(v is None or v.shape != param.shape for v in state.values()):
                raise fail(f"{OPTIMIZER_FILE} has no usable Adam moments for {name}")
            moments.append(state)
    return moments, step
