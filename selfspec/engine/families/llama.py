"""Llama's layer, which every family here starts from: `h += attn(norm(h)); h += mlp(norm(h))` with an RMSNorm that
rounds before its weight, rotary q/k and a SiLU-gated MLP (llama, qwen2; mistral slides every layer's window).

A family module overrides only what its layer does differently; the engine calls nothing else of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from ..ops import attend, rotate

if TYPE_CHECKING:
    from ..fused import FusedLayer, FusedLinear
    from ..span import Span


class Llama:
    """A family's layer for one model config."""

    model_types = ("llama", "qwen2")
    # The model's own norm modules around each sublayer, as the reference path runs them: (before, after).
    attention_norms: tuple[str, str | None] = ("input_layernorm", None)
    mlp_norms: tuple[str, str | None] = ("post_attention_layernorm", None)

    def __init__(self, config: PretrainedConfig):
        self.config = config

    def unfusable(self) -> str | None:
        """What in this config the fused forward does not compute (None: it computes it all)."""
        if self.config.hidden_act != "silu":
            return f"hidden_act {self.config.hidden_act!r}"
        if getattr(self.config, "mlp_bias", False):
            return "MLP biases"
        return None

    def window(self, layer: int) -> int | None:
        """The sliding window layer `layer` attends over (None: every earlier position)."""
        types = getattr(self.config, "layer_types", None)
        return self.config.sliding_window if types and types[layer] == "sliding_attention" else None

    def rope_key(self, layer: int) -> str | None:
        """Which of `rope`'s embeddings layer `layer` rotates by."""
        return None

    def rope(self, rotary: nn.Module, h: torch.Tensor, positions: torch.Tensor) -> dict:
        """rope key -> the model's own (cos, sin) [1, T, head_dim] for positions [T]."""
        return {None: rotary(h, positions.unsqueeze(0))}

    # --- the fused forward: one layer over `FusedLayer`'s matrices and the model's own norm modules -------------

    def norm(self, h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        # normalised in float32 and rounded before the weight, as the model's own RMSNorm does
        unit = F.rms_norm(h.float(), (h.shape[-1],), None, norm.variance_epsilon)
        return norm.weight * unit.to(h.dtype)

    def query_key_norms(self, layer: FusedLayer, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q [B, T, H, hd] and k [B, T, H_kv, hd] before the rotary embedding."""
        return q, k

    def attention(self, layer: FusedLayer, i: int, h: torch.Tensor, span: Span, cache) -> torch.Tensor:
        """The residual update of layer i's attention for h [B, T, D]; writes the layer's K/V into `cache`."""
        batch, count, _ = h.shape
        q, k, v = layer.qkv.split(self.norm(h, layer.norms[self.attention_norms[0]]))  # [B, T, heads * hd] each
        q, k, v = (t.view(batch, count, -1, layer.head_dim) for t in (q, k, v))  # [B, T, H, hd]
        q, k = self.query_key_norms(layer, q, k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        cos, sin = (t.unsqueeze(1) for t in span.rope[layer.rope_key])  # [1, 1, T, hd]
        keys, values = cache.update(rotate(k, cos, sin), v, i)  # [B, H_kv, visible, hd]
        first, mask = span.sliding(layer.window) if layer.window else (0, span.mask)
        out = attend(rotate(q, cos, sin), keys[:, :, first:], values[:, :, first:], mask, layer.scaling)
        return self.after_attention(layer, layer.o(out.transpose(1, 2).reshape(batch, count, -1)))

    def after_attention(self, layer: FusedLayer, out: torch.Tensor) -> torch.Tensor:
        return out

    def mlp(self, layer: FusedLayer, h: torch.Tensor) -> torch.Tensor:
        """The residual update of a layer's MLP for h [B, T, D]."""
        gate, up = layer.gate_up.split(self.norm(h, layer.norms[self.mlp_norms[0]]))
        return self.after_mlp(layer, layer.down(self.activation(gate) * up))

    def activation(self, gate: torch.Tensor) -> torch.Tensor:
        return F.silu(gate)

    def after_mlp(self, layer: FusedLayer, out: torch.Tensor) -> torch.Tensor:
        return out

    def logits(self, head: FusedLinear, final_norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return head(self.norm(h, final_norm))  # [B, T, V]


class Mistral(Llama):
    """Llama's layer with a sliding window on every layer (when the config sets one)."""

    model_types = ("mistral",)

    def window(self, layer: int) -> int | None:
        return getattr(self.config, "sliding_window", None)
