"""Qwen 3's layer: llama's, with an RMSNorm over each head's queries and keys before the rotary embedding."""

from __future__ import annotations

import torch

from .llama import Llama


class Qwen3(Llama):
    model_types = ("qwen3",)

    def query_key_norms(self, layer, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.norm(q, layer.norms["q_norm"]), self.norm(k, layer.norms["k_norm"])
