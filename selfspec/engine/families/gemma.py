"""Gemma's layers. Gemma: llama's layout with an RMSNorm that scales by (1 + weight) in float32 before it rounds,
and a GELU-gated (tanh) MLP; the embedding's sqrt(hidden) scale is the model's own embedding module's. Gemma 3 adds a
norm after each sublayer and one on each head's queries and keys, and interleaves sliding-window layers, which
rotate by their own rotary base, with full-attention ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .llama import Llama


class Gemma(Llama):
    model_types = ("gemma",)

    def unfusable(self) -> str | None:
        activation = getattr(self.config, "hidden_activation", None) or self.config.hidden_act
        if activation != "gelu_pytorch_tanh":
            return f"hidden_activation {activation!r}"
        if getattr(self.config, "attn_logit_softcapping", None) is not None:
            return "attention logit soft-capping"
        return None

    def norm(self, h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        unit = F.rms_norm(h.float(), (h.shape[-1],), None, norm.eps)
        return (unit * (1.0 + norm.weight.float())).to(h.dtype)

    def activation(self, gate: torch.Tensor) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh")

    def logits(self, head, final_norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
        logits = head(self.norm(h, final_norm))  # [B, T, V]
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3(Gemma):
    model_types = ("gemma3_text",)
    attention_norms = ("input_layernorm", "post_attention_layernorm")
    mlp_norms = ("pre_feedforward_layernorm", "post_feedforward_layernorm")

    def rope_key(self, layer: int) -> str:
        return self.config.layer_types[layer]

    def rope(self, rotary: nn.Module, h: torch.Tensor, positions: torch.Tensor) -> dict:
        return {kind: rotary(h, positions.unsqueeze(0), kind) for kind in set(self.config.layer_types)}

    def query_key_norms(self, layer, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.norm(q, layer.norms["q_norm"]), self.norm(k, layer.norms["k_norm"])

    def after_attention(self, layer, out: torch.Tensor) -> torch.Tensor:
        return self.norm(out, layer.norms[self.attention_norms[1]])

    def after_mlp(self, layer, out: torch.Tensor) -> torch.Tensor:
        return self.norm(out, layer.norms[self.mlp_norms[1]])
