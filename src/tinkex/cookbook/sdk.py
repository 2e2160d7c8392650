"""The few things the loops need to stay SDK-neutral.

The loops accept any service client with the Tinker API: the tinkex SDK's (the default) or the
official `tinker` SDK's. Each SDK validates requests against its *own* pydantic types, so a
`ModelInput` or `SamplingParams` must come from the module of the client it is handed to;
`types_for(client)` finds that module.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

BUILTIN_MODEL = "tinkex/tiny-qwen3"  # the engine's built-in model: random-init, needs no network


def types_for(client: Any) -> ModuleType:
    """`tinker.types` for the official SDK's clients, `tinkex.types` for ours (and as the fallback)."""
    root = type(client).__module__.split(".", 1)[0]
    if root in ("tinker", "tinkex"):
        return importlib.import_module(f"{root}.types")
    return importlib.import_module("tinkex.types")


def resolved(value: Any) -> Any:
    """The client behind a creation call: SDK 0.38 returns a future of it (`.result()`), older ones the client."""
    result = getattr(value, "result", None)
    return result() if callable(result) else value


def default_service_client(base_url: str | None = None, api_key: str | None = None) -> Any:
    """`tinkex.ServiceClient` -- which starts the embedded server when nothing is configured."""
    import tinkex

    return tinkex.ServiceClient(base_url=base_url, api_key=api_key)


def make_datum(types: ModuleType, tokens: list[int], **per_token: Any) -> Any:
    """A next-token datum for a full sequence: input tokens[:-1], and for every keyword a
    per-token array (aligned with `tokens`) shifted the same way, e.g. weights=[...] -> weights[1:].
    `target_tokens` are always tokens[1:]."""
    inputs: dict[str, Any] = {"target_tokens": np.asarray(tokens[1:], dtype=np.int64)}
    for name, values in per_token.items():
        array = np.asarray(values, dtype=np.float32)
        if len(array) != len(tokens):
            raise ValueError(f"{name} has {len(array)} entries for {len(tokens)} tokens")
        inputs[name] = array[1:]
    return types.Datum(model_input=types.ModelInput.from_ints(list(tokens[:-1])), loss_fn_inputs=inputs)


def to_numpy(value: Any) -> np.ndarray:
    """A loss output or input (TensorData, tensor, list) as a numpy array."""
    if hasattr(value, "to_numpy"):
        return np.asarray(value.to_numpy())
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    if hasattr(value, "data") and hasattr(value, "dtype") and not isinstance(value, np.ndarray):
        return np.asarray(value.data)
    return np.asarray(value)
