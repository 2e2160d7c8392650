"""Tokenizers for base models, loaded with Hugging Face `AutoTokenizer` and cached per process.

The tokenizer id is the server's `tokenizer_id` when it gave one, else derived from the model
name; both are cut at the first `:`. Works offline whenever the files are in the local HF cache
(set HF_HUB_OFFLINE=1 to forbid network access).
"""

from __future__ import annotations

import functools
from typing import Any

# Kimi tokenizers are tiktoken-based remote code, pinned to a reviewed revision.
_KIMI: dict[str, tuple[str, str]] = {
    "moonshotai/Kimi-K2-Thinking": ("moonshotai/Kimi-K2-Thinking", "612681931a8c906ddb349f8ad0f582cb552189cd"),
    "moonshotai/Kimi-K2.5-Text-Only": ("moonshotai/Kimi-K2.5", "4d01dfe0332d63057c186e0b262165819efb6611"),
    "moonshotai/Kimi-K2.5": ("moonshotai/Kimi-K2.5", "4d01dfe0332d63057c186e0b262165819efb6611"),
    "moonshotai/Kimi-K2.6": ("moonshotai/Kimi-K2.6", "b5aabbfb20227ed42becbf5541dbffd213942c58"),
    "moonshotai/Kimi-K3": ("moonshotai/Kimi-K3", "f831ab66814297da540d832a5235f8e904f29d06"),
}
_LLAMA3_TOKENIZER = "thinkingmachineslabinc/meta-llama-3-instruct-tokenizer"


def tokenizer_id_for(model_name: str, tokenizer_id: str | None = None) -> str:
    """The repo (or local path) to load the tokenizer from."""
    if tokenizer_id:
        return tokenizer_id.split(":", 1)[0]
    name = model_name.split(":", 1)[0]
    if name.startswith("meta-llama/Llama-3"):
        return _LLAMA3_TOKENIZER
    parts = name.split("/")
    if len(parts) == 3 and not name.startswith("/") and not name.startswith("."):
        return "/".join(parts[:2])
    return name


def load_kwargs_for(tokenizer_id: str) -> tuple[str, dict[str, Any]]:
    if tokenizer_id in _KIMI:
        repo, revision = _KIMI[tokenizer_id]
        return repo, {"trust_remote_code": True, "revision": revision}
    return tokenizer_id, {}


@functools.lru_cache(maxsize=32)
def _load(tokenizer_id: str) -> Any:
    if tokenizer_id.startswith("TML/") or tokenizer_id.startswith("thinkingmachines/"):
        try:
            from tml_tokenizers.tinker_tokenizers import get_tinker_tokenizer  # type: ignore[import-not-found]
        except ImportError as exc:
            raise RuntimeError(
                f"The tokenizer {tokenizer_id!r} needs the tml_tokenizers package; install it, or construct a "
                "renderer with tml-renderers."
            ) from exc
        return get_tinker_tokenizer(tokenizer_id)
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise RuntimeError("get_tokenizer() needs the `transformers` package: pip install 'tinkex[tokenizers]'") from exc
    repo, kwargs = load_kwargs_for(tokenizer_id)
    return AutoTokenizer.from_pretrained(repo, use_fast=True, **kwargs)


def get_tokenizer(model_name: str, tokenizer_id: str | None = None) -> Any:
    return _load(tokenizer_id_for(model_name, tokenizer_id))
