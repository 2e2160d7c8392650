"""The base models an engine (or a pool of engine workers) serves, by name.

Their info and tokenizers answer without loading any weights. Torch-free, so a pool can use it in
a server process that never loads a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .api import BaseModelInfo, EngineError

if TYPE_CHECKING:
    from .models import BaseModel


class ServedModels:
    """Mixed into Engine and WorkerPool, which fill `_bases`."""

    _bases: dict[str, BaseModel]

    def model_infos(self) -> list[BaseModelInfo]:
        return [base.info for base in self._bases.values()]

    def model_info(self, base_model: str) -> BaseModelInfo:
        return self._base(base_model).info

    def tokenizer(self, base_model: str):
        return self._base(base_model).tokenizer

    def _base(self, name: str) -> BaseModel:
        try:
            return self._bases[name]
        except KeyError:
            raise EngineError(f"base model {name!r} is not served here (served: {', '.join(self._bases)})") from None
