"""A lean forward for Llama-style models (Llama, Mistral, Qwen2, Qwen3): one decode step, or whole
sequences for training.

The Hugging Face forward does a lot per call that these do not need: mask building, cache
bookkeeping, output dataclasses, keyword plumbing through every layer. Here a forward calls the
model's own submodules -- embeddings, norms, the (LoRA-wrapped) projections, the MLPs, the rotary
embedding, the head -- in the order the model does, attending with
`F.scaled_dot_product_attention`. A decode step writes each layer's new key and value straight into
a preallocated cache (kvcache.DenseCache); a training forward attends causally over right-padded
rows. Same modules, same weights, same adapters: the logits agree with the Hugging Face forward to
float rounding (tests/engine/test_decode.py). On a small model the plumbing is a fair share of a
step, and all of it is Python under the server's one GIL.

Models of other architectures, or with sliding-window layers, have no lean forward (`for_model`
returns None) and run through the Hugging Face forward (kvcache.RowCache when decoding).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from . import lora
from .models import BaseModel

# Architectures whose decoder layer is: x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x)),
# with rotary q/k (Qwen3 also RMS-normalises q and k per head), no other per-layer state.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Their norms: weight * x / sqrt(mean(x^2) + eps), what F.rms_norm computes (see _rms_norm).
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class LeanDecoder:
    def __init__(self, base: BaseModel):
        model = base.model
        self.routing = base.routing  # not the base model itself: see for_model's cache
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.head = model.get_output_embeddings()
        attn = self.layers[0].self_attn
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.groups = self.heads // self.kv_heads  # query heads per key/value head
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.qk_norm = hasattr(attn, "q_norm")

    def forward(self, tokens: torch.Tensor, cache, owners: list[str | None]) -> torch.Tensor:
        """One token per row [n] at each row's next position; writes their keys and values into
        `cache` (a DenseCache with room for them) and returns the next-token logits [n, vocab]."""
        n = tokens.shape[0]
        positions = cache.lengths  # a row's next position is its length: rows start at position 0
        width = cache.max_length + 1
        rows = torch.arange(n, device=tokens.device)
        # Column c of row r is attended to when it holds a token: c <= the new token's position.
        mask = (torch.arange(width, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
        routing = self.routing
        routing.set(lora.groups_from_owners(owners))
        try:
            hidden = self.inner.embed_tokens(tokens)  # [n, hidden]
            cos, sin = self.inner.rotary_emb(hidden[:, None], positions[:, None])  # [n, 1, head_dim]
            for index, layer in enumerate(self.layers):
                q, k, v = self._qkv(layer, hidden, cos, sin)  # [n, heads, head_dim]
                keys, values = cache.layer(index)
                keys[rows, :, positions] = k
                values[rows, :, positions] = v
                # Each key/value head's queries as a query "length" of their own: every cached key is
                # read once, not once per query head that shares it.
                out = F.scaled_dot_product_attention(q.view(n, self.kv_heads, self.groups, self.head_dim),
                                                     keys[:n, :, :width], values[:n, :, :width],
                                                     attn_mask=mask, scale=self.scaling)
                hidden = _finish_layer(layer, hidden, out.reshape(n, self.heads * self.head_dim))
            return self.head(_rms_norm(self.inner.norm, hidden))
        finally:
            routing.clear()

    def forward_sequences(self, input_ids: torch.Tensor,
                          keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None, *,
                          head: bool = True) -> torch.Tensor:
        """Whole right-padded rows [b, t] from position 0, with causal attention (a real token never
        sees a pad to its right): the training forward, and the sampler's prefill, which passes
        `keys_values` to get each layer's keys and values [b, kv heads, t, head_dim] appended.
        Returns the head's output -- what the routing's head_index keeps, or [b, t, vocab] -- or with
        `head=False` the final-normed hidden states [b, t, hidden] the head would read."""
        b, t = input_ids.shape
        hidden = self.inner.embed_tokens(input_ids)  # [b, t, hidden]
        positions = torch.arange(t, device=input_ids.device)[None].expand(b, t)
        cos, sin = self.inner.rotary_emb(hidden, positions)  # [b, t, head_dim]
        cos, sin = cos[:, :, None], sin[:, :, None]
        for layer in self.layers:
            q, k, v = self._qkv(layer, hidden, cos, sin)  # [b, t, heads, head_dim]
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if keys_values is not None:
                keys_values.append((k, v))
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, scale=self.scaling,
                                                 enable_gqa=self.kv_heads != self.heads)
            hidden = _finish_layer(layer, hidden, out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        hidden = _rms_norm(self.inner.norm, hidden)
        return self.head(hidden) if head else hidden

    def _qkv(self, layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """A layer's rotated queries, keys and values for `hidden` [..., hidden]: [..., heads, head_dim]."""
        attn, lead = layer.self_attn, hidden.shape[:-1]
        x = _rms_norm(layer.input_layernorm, hidden)
        q = attn.q_proj(x).view(*lead, self.heads, self.head_dim)
        k = attn.k_proj(x).view(*lead, self.kv_heads, self.head_dim)
        v = attn.v_proj(x).view(*lead, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = _rms_norm(attn.q_norm, q), _rms_norm(attn.k_norm, k)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def _finish_layer(layer, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of a decoder layer after attention: output projection and MLP, each a residual."""
    hidden = hidden + layer.self_attn.o_proj(attended)
    return hidden + layer.mlp(_rms_norm(layer.post_attention_layernorm, hidden))


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """What the model's RMSNorm module computes (weight * x / sqrt(mean(x^2) + eps)), for float32 as
    one fused op instead of the module's six: the same numbers, ~4 us less per call -- a dozen calls
    a decode step on a small model. (Other dtypes: the module, which normalises in float32.)"""
    if x.dtype != torch.float32 or norm.weight.dtype != torch.float32:
        return norm(x)
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [..., heads, head_dim] with cos/sin [..., 1, head_dim] (the HF formula)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# model -> its lean decoder (None: it has none). Every training step and every decode batch asks, and
# the answer walks the model's modules: worked out once per model. Keyed weakly, and the decoder
# holds the model's parts but not the model, so an engine's models are still freed with it.
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def for_model(base: BaseModel) -> LeanDecoder | None:
    """The lean decoder of this base model, or None where its architecture is not one it knows."""
    model = base.model
    if model not in _DECODERS:
        _DECODERS[model] = _lean_decoder(base)
    return _DECODERS[model]


def _lean_decoder(base: BaseModel) -> LeanDecoder | None:
    model = base.model
    if type(model).__name__ not in ARCHITECTURES:
        return None
    config = model.config
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ["full_attention"]):
        return None
    if type(model).__name__ == "MistralForCausalLM" and getattr(config, "sliding_window", None):
        return None
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, name) for name in needed):
        return None
    norms = [inner.norm] + [module for layer in inner.layers for module in layer.modules() if "Norm" in type(module).__name__]
    if any(type(norm).__name__ not in RMS_NORMS for norm in norms):
        return None
    return LeanDecoder(base)
