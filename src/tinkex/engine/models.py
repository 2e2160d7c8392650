"""Base models: where their files are, what they are (read from the config alone), and loading.

A base model is loaded once, on first use, with the ordinary `AutoModelForCausalLM.from_pretrained`,
in float32 and frozen; its target linears are then wrapped for multi-tenant LoRA (lora.py). Every
adapter on that base model shares this one copy of the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import builtin, gemm, lora
from .api import BUILTIN_MODEL, BaseModelInfo, EngineError
from .util import quiet_progress


def resolve(name: str, cache_dir: Path) -> Path:
    """The local directory holding `name`: the built-in model, a directory, or a hub-cache snapshot."""
    if name == BUILTIN_MODEL:
        return builtin.materialize(cache_dir)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:  # local_files_only: only looks in the cache, never at the network
        return Path(snapshot_download(name, cache_dir=cache_dir, local_files_only=True))
    except Exception as exc:
        raise EngineError(
            f"base model {name!r} is neither a local directory nor in the Hugging Face cache at {cache_dir}"
        ) from exc


def read_info(name: str, directory: Path) -> BaseModelInfo:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as exc:
        raise EngineError(f"base model {name!r}: cannot read its config in {directory}: {exc}") from exc
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    architectures = getattr(config, "architectures", None) or [config.model_type]
    return BaseModelInfo(
        name=name,
        arch=architectures[0],
        tokenizer_id=name,
        vocab_size=int(text.vocab_size),
        max_context_length=int(getattr(text, "max_position_embeddings", 0) or 2**31 - 1),
    )


class BaseModel:
    """One served base model: its info at once, its weights and tokenizer on first use."""

    def __init__(self, name: str, directory: Path, device: torch.device):
        self.name = name
        self.directory = directory
        self.device = device
        self.info = read_info(name, directory)
        self._model: nn.Module | None = None
        self._tokenizer = None
        self.routing: lora.Routing | None = None
        self.modules: dict[str, lora.LoraLinear] = {}  # module path -> wrapped linear
        self._eos_ids: frozenset[int] | None = None

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._load()
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.directory)
        return self._tokenizer

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM

        with quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(self.directory)
        model = model.to(device=self.device, dtype=torch.float32).eval()
        model.requires_grad_(False)
        self.routing, self.modules = lora.inject(model)
        # Sampling may keep oneDNN-packed copies of the projection weights (gemm.pack) if they are small
        # enough to have twice. A tied head shares its weight with the embedding: counted once.
        weights = {id(m.base.weight): m.base.weight for m in self.modules.values()}.values()
        if sum(w.numel() * w.element_size() for w in weights) <= gemm.MAX_PACKED_BYTES:
            for module in self.modules.values():
                module.packable = True
        self._model = model

    @property
    def eos_ids(self) -> frozenset[int]:
        """Token ids that end a sample when the caller gives no stop tokens: the tokenizer's EOS
        and the generation config's (Qwen3's lists both <|im_end|> and <|endoftext|>)."""
        if self._eos_ids is None:
            ids: set[int] = set()
            if self.tokenizer.eos_token_id is not None:
                ids.add(int(self.tokenizer.eos_token_id))
            generation_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
            if generation_eos is not None:
                ids.update(int(i) for i in ([generation_eos] if isinstance(generation_eos, int) else generation_eos))
            self._eos_ids = frozenset(ids)
        return self._eos_ids

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """{module path: (in_features, out_features)} of every LoRA-targetable module."""
        self.model  # noqa: B018 -- loads on first use
        return {path: (m.in_features, m.out_features) for path, m in self.modules.items()}
