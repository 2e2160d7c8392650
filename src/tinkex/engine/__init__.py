"""tinkex's compute engine: base models, multi-tenant LoRA, losses, AdamW, sampler, checkpoints.

`from tinkex.engine import Engine` loads torch; the interface types (tinkex.engine.api, re-exported
here) do not, so the server can build jobs without paying for torch until it makes an Engine.
"""

from .api import (
    BUILTIN_MODEL,
    LORA_ALPHA,
    LOSS_INPUTS,
    AdamHyper,
    BaseModelInfo,
    DatumArrays,
    EngineError,
    ForwardBackwardJob,
    ForwardBackwardResult,
    LoraSpec,
    LossSpec,
    SampledSeq,
    SampleJob,
    SampleResult,
)

__all__ = [
    "BUILTIN_MODEL", "LORA_ALPHA", "LOSS_INPUTS", "AdamHyper", "BaseModelInfo", "DatumArrays", "Engine",
    "EngineError", "ForwardBackwardJob", "ForwardBackwardResult", "LoraSpec", "LossSpec", "SampledSeq", "SampleJob",
    "SampleResult",
]


def __getattr__(name: str):
    if name == "Engine":  # imported on first use: it pulls in torch and transformers
        from .engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
