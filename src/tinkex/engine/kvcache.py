"""The KV cache of a batch of decode rows that started at different times, in two kinds.

`DenseCache` serves the architectures that have a lean decoder (decode.py): per layer, preallocated
key/value buffers [rows, kv heads, length, head dim] whose capacity doubles when it runs out. Every
row starts at column 0 (its first prompt token) and has its own length; a decode step writes each
row's new key and value at that row's length and attends to the columns below it. Prompts are
prefilled by the lean decoder too. Rows join by a copy into the rows after the running ones, and
leave by one gather that closes the gaps: no padding, no concatenation per step. `new_cache` picks
it where it can.

`RowCache` is the general one, for any model the Hugging Face forward runs. Rows are left-padded
to a common cache width: each row has its own attention mask (zeros over its padding) and its own
next position id, so a row's computation never depends on where it sits or how long the other rows
are. That is what lets a new request join a running batch: its prompt is
prefilled on its own, and its cache rows are padded on the left and concatenated to the running
ones (`extend`); rows that finish are dropped (`select`), and padding that no row needs any more is
cut off (`_trim`).

Joining needs the cache's per-layer key/value tensors, which transformers' `DynamicCache` of
ordinary (full-attention) layers exposes. For other cache kinds (sliding windows, quantized, ...)
`mergeable` is False and the sampler simply lets new requests wait for the running batch to finish.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from . import decode as lean
from . import lora
from .models import BaseModel


def new_cache(base: BaseModel) -> DenseCache | RowCache:
    """An empty cache for decoding rows of this base model: dense where a lean decoder exists."""
    decoder = lean.for_model(base)
    return DenseCache(base, decoder) if decoder is not None else RowCache(base)


class RowCache:
    def __init__(self, base: BaseModel):
        self.base, self.device = base, base.device
        self.cache = None
        self.attention: torch.Tensor | None = None  # int64 [rows, width]: 1 where a row has a token
        self.next_pos: torch.Tensor | None = None  # int64 [rows]: position id of each row's next token
        # transformers >= 5.2x names the argument `cache`; earlier versions `past_key_values`.
        parameters = inspect.signature(base.model.forward).parameters
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"

    @property
    def rows(self) -> int:
        return 0 if self.attention is None else self.attention.shape[0]

    @property
    def mergeable(self) -> bool:
        """Whether other rows can be added to this cache (see the module docstring)."""
        return self.cache is None or _layers(self.cache) is not None

    def prefill(self, input_ids: torch.Tensor, attention: torch.Tensor, owners: list[str | None],
                head: tuple[torch.Tensor, list]) -> torch.Tensor:
        """Left-padded prompts [rows, width] with their mask, into an empty cache; returns the logits
        at the `head` positions (flat indices into [rows * width]) only."""
        assert self.cache is None, "prefill starts a cache"
        self.attention = attention
        self.next_pos = attention.sum(-1)  # the first sampled token follows the prompt
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        return self._forward(input_ids, positions, owners, head)

    def decode(self, tokens: torch.Tensor, owners: list[str | None]) -> torch.Tensor:
        """One new token per row; next-token logits [rows, vocab]."""
        self.attention = torch.cat([self.attention, self.attention.new_ones(len(tokens), 1)], dim=1)
        logits = self._forward(tokens[:, None], self.next_pos[:, None], owners)[:, -1]
        self.next_pos = self.next_pos + 1
        return logits

    def _forward(self, input_ids, position_ids, owners, head=None) -> torch.Tensor:
        routing = self.base.routing
        groups = lora.groups_from_owners(owners)  # row r belongs to adapter owners[r] (None: base)
        head_index, head_groups = head if head is not None else (None, None)
        routing.set(groups, head_index, head_groups)
        kwargs = {self.cache_arg: self.cache} if self.cache is not None else {}
        try:
            out = self.base.model(input_ids=input_ids, attention_mask=self.attention, position_ids=position_ids,
                                  use_cache=True, **kwargs)
        finally:
            routing.clear()
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else getattr(out, "past_key_values", None)
        return out.logits

    def select(self, rows: list[int]) -> None:
        """Keep (or repeat) these rows, in this order."""
        if not rows:
            self.cache = self.attention = self.next_pos = None
            return
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, device=self.device)
        self.cache.reorder_cache(index)
        self.attention = self.attention.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)
        self._trim()

    def extend(self, other: RowCache) -> None:
        """Append the rows of `other` (a freshly prefilled cache) after this cache's rows."""
        if other.cache is None:
            return
        if self.cache is None:
            self.cache, self.attention, self.next_pos = other.cache, other.attention, other.next_pos
            return
        mine, theirs = _layers(self.cache), _layers(other.cache)
        assert mine is not None and theirs is not None and len(mine) == len(theirs), "caches cannot be joined"
        width = max(self.attention.shape[1], other.attention.shape[1])
        for a, b in zip(mine, theirs):
            a.keys = torch.cat([_pad_left(a.keys, width, dim=2), _pad_left(b.keys, width, dim=2)])
            a.values = torch.cat([_pad_left(a.values, width, dim=2), _pad_left(b.values, width, dim=2)])
        self.attention = torch.cat([_pad_left(self.attention, width, dim=1), _pad_left(other.attention, width, dim=1)])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])

    def _trim(self) -> None:
        """Cut the leading columns that are padding in every row (left by rows that finished)."""
        layers = _layers(self.cache)
        if layers is None:
            return
        used = self.attention.any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first == 0:
            return
        for layer in layers:
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]
        self.attention = self.attention[:, first:]


def _layers(cache) -> list | None:
    """The cache's layers if every one is a plain growing full-attention layer, else None."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or layer.keys is None for layer in layers):
        return None
    return list(layers)


def _pad_left(tensor: torch.Tensor, width: int, *, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]  # F.pad lists dimensions from the last
    return F.pad(tensor, pad)


class DenseCache:
    """Preallocated, left-aligned per-row caches decoded by a LeanDecoder (see the module docstring)."""

    mergeable = True

    def __init__(self, base: BaseModel, decoder: lean.LeanDecoder):
        self.base, self.device, self.decoder = base, base.device, decoder
        self.keys: torch.Tensor | None = None  # [layers, row capacity, kv heads, length capacity, head dim]
        self.values: torch.Tensor | None = None
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.device)  # tokens cached per row
        self.max_length = 0

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]

    def prefill(self, input_ids: torch.Tensor, attention: torch.Tensor, owners: list[str | None],
                head: tuple[torch.Tensor, list]) -> torch.Tensor:
        """As RowCache.prefill, through the lean decoder: the left-padded prompts are shifted to start
        at column 0 (right padding, as this cache keeps rows), run once with causal attention, and
        every layer's keys and values become the cache as they are."""
        assert self.rows == 0, "prefill starts a cache"
        lengths = attention.sum(-1)
        width = input_ids.shape[1]
        shift = width - lengths  # row r's tokens sit in columns shift[r] .. width - 1
        source = (torch.arange(width, device=self.device)[None, :] + shift[:, None]).clamp(max=width - 1)
        head_index, head_groups = head
        # The kept positions, moved with their rows; the pads' ids are never attended by a real token.
        self.base.routing.set(lora.groups_from_owners(owners), head_index - shift[head_index // width], head_groups)
        keys_values: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            logits = self.decoder.forward_sequences(input_ids.gather(1, source), keys_values)
        finally:
            self.base.routing.clear()
        self.keys = torch.stack([k for k, _ in keys_values])  # [layers, rows, kv heads, width, head dim]
        self.values = torch.stack([v for _, v in keys_values])
        self.lengths, self.max_length = lengths, int(lengths.max())
        return logits

    def decode(self, tokens: torch.Tensor, owners: list[str | None]) -> torch.Tensor:
        """One new token per row; next-token logits [rows, vocab]."""
        self._reserve(self.rows, self.max_length + 1)
        logits = self.decoder.forward(tokens, self, owners)
        self.lengths = self.lengths + 1
        self.max_length += 1
        return logits

    def select(self, rows: list[int]) -> None:
        """Keep (or repeat) these rows, in this order."""
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.lengths = self.lengths.index_select(0, index)
        if not rows:
            self.keys = self.values = None  # nothing to keep: free the buffers
            self.max_length = 0
            return
        width = self.max_length
        self._reserve(len(rows), width)
        self.keys[:, :len(rows), :, :width] = self.keys[:, index, :, :width]
        self.values[:, :len(rows), :, :width] = self.values[:, index, :, :width]
        self.max_length = int(self.lengths.max())

    def extend(self, other: DenseCache) -> None:
        """Append the rows of `other` (a freshly prefilled cache) after this cache's rows."""
        if other.rows == 0:
            return
        if self.rows == 0:
            self.keys, self.values = other.keys, other.values
            self.lengths, self.max_length = other.lengths, other.max_length
            return
        start, stop, width = self.rows, self.rows + other.rows, other.max_length
        self._reserve(stop, max(self.max_length, width))
        self.keys[:, start:stop, :, :width] = other.keys[:, :other.rows, :, :width]
        self.values[:, start:stop, :, :width] = other.values[:, :other.rows, :, :width]
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.max_length = max(self.max_length, width)

    def _reserve(self, rows: int, length: int) -> None:
        """Make room for this many rows and columns, doubling what runs out (the contents stay)."""
        layers, have_rows, kv_heads, have_length, head_dim = self.keys.shape
        if rows <= have_rows and length <= have_length:
            return
        new_rows = have_rows if rows <= have_rows else max(rows, 2 * have_rows)
        new_length = have_length if length <= have_length else max(length, 2 * have_length)
        for name in ("keys", "values"):
            old = getattr(self, name)
            grown = old.new_zeros(layers, new_rows, kv_heads, new_length, head_dim)
            grown[:, :have_rows, :, :have_length] = old
            setattr(self, name, grown)
