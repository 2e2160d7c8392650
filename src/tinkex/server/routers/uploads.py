"""Bringing weights in: a PEFT LoRA adapter trained elsewhere, uploaded as multipart, becomes a sampler
checkpoint of the tenant (sample from it, serve it on /v1, download it again)."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, UploadFile
from safetensors import safe_open

from tinkex.types import tinker_path

from ..deps import RuntimeDep, TenantDep
from ..runtime import bad_request
from ..store import CheckpointRow, TrainingRunRow

router = APIRouter(prefix="/api/v1")


@router.post("/checkpoints/import")
async def import_adapter(config: UploadFile, weights: UploadFile, name: Annotated[str, Form()],
                         base_model: Annotated[str, Form()], runtime: RuntimeDep, tenant: TenantDep) -> dict:
    """Form fields: `config` (adapter_config.json), `weights` (adapter_model.safetensors), `name`, `base_model`."""
    name = runtime.checkpoint_name(name)
    info = runtime.model_info(base_model)
    staging = Path(tempfile.mkdtemp(dir=runtime.settings.data_dir))
    try:
        for upload, filename in ((config, "adapter_config.json"), (weights, "adapter_model.safetensors")):
            with open(staging / filename, "wb") as out:
                while chunk := await upload.read(1 << 20):
                    out.write(chunk)
        try:
            config = json.loads((staging / "adapter_config.json").read_text())
            with safe_open(staging / "adapter_model.safetensors", "pt") as tensors:
                keys = list(tensors.keys())
        except Exception as exc:
            raise bad_request(f"not a PEFT LoRA adapter: {exc}") from None
        if config.get("peft_type", "LORA") != "LORA" or not any("lora_A" in key for key in keys):
            raise bad_request("not a PEFT LoRA adapter: adapter_config.json must describe LORA and the weights "
                              "must hold lora_A / lora_B tensors")
        run_id = f"import-{uuid.uuid4().hex[:12]}"
        directory = runtime.checkpoint_dir(tenant, run_id, "sampler", name)
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    runtime.store.add(TrainingRunRow(id=run_id, tenant=tenant, session_id="", base_model=info.name,
                                     lora_rank=int(config.get("r", 0)), user_metadata={"imported": "true"}))
    path = tinker_path(run_id, "sampler", name)
    size = sum(p.stat().st_size for p in directory.iterdir())
    runtime.store.add(CheckpointRow(tinker_path=path, tenant=tenant, training_run_id=run_id, checkpoint_type="sampler",
                                    name=name, directory=str(directory), size_bytes=size))
    return {"tinker_path": path}
