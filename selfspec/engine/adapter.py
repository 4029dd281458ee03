"""Per-architecture access to a causal LM's parts: embedding, sublayers, final norm, LM head.

The reference path never forks transformers' modeling code: it calls the model's own modules (norms, attention with
its attention interface, MLP) one sublayer at a time, which is what lets a draft skip a sublayer or stop early while
the verify pass runs the very same code as `model.generate`. Where the norms sit around each sublayer, the rotary
embeddings and the sliding windows are the family's (`families/`).
"""

import inspect
from dataclasses import InitVar, dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import UnsupportedModelError
from .families import Llama, family_of
from .span import Span

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class Adapter:
    """How to run one sublayer of a supported model; holds references to its modules, never copies of weights,
    and not the model itself: the engine keeps its adapters in a dictionary keyed weakly by the model, which a
    reference back to the model would keep alive for good (with every derived weight)."""

    model: InitVar[PreTrainedModel]
    family: Llama

    def __post_init__(self, model: PreTrainedModel) -> None:
        inner = model.model
        self.layers: nn.ModuleList = inner.layers
        self.embed_tokens: nn.Module = inner.embed_tokens
        self.rotary: nn.Module = inner.rotary_emb
        self.final_norm: nn.Module = inner.norm
        self.lm_head: nn.Module = model.lm_head
        self.config = model.config
        self.num_layers: int = len(self.layers)
        self.attn_implementation: str = model.config._attn_implementation
        self.windows = tuple(self.family.window(i) for i in range(self.num_layers))
        self.rope_keys = tuple(self.family.rope_key(i) for i in range(self.num_layers))
        # transformers 5.25 renamed the attention modules' `past_key_values` to `cache` (the old name warns)
        parameters = inspect.signature(type(self.layers[0].self_attn).forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # [B, T] -> [B, T, D]

    def position_embeddings(self, h: torch.Tensor, positions: torch.Tensor) -> dict:
        return self.family.rope(self.rotary, h, positions)  # rope key -> cos, sin: [1, T, head_dim]

    def attention(self, i: int, h: torch.Tensor, span: Span, cache, weights=None) -> torch.Tensor:
        """The residual update of layer i's attention sublayer; writes the layer's K/V into `cache`.

        `weights` (derived low-bit weights) exist only for the fused forward (`selfspec.engine.fused`)."""
        _no_derived(weights)
        layer = self.layers[i]
        before, after = self.family.attention_norms
        window = self.windows[i]
        mask = span.sliding_full_width(window, self.attn_implementation, h.dtype) if window else span.mask
        out, _ = layer.self_attn(
            hidden_states=getattr(layer, before)(h),
            position_embeddings=span.rope[self.rope_keys[i]],
            attention_mask=mask,
            **{self.cache_argument: cache},
        )
        return out if after is None else getattr(layer, after)(out)

    def mlp(self, i: int, h: torch.Tensor, weights=None) -> torch.Tensor:
        _no_derived(weights)
        layer = self.layers[i]
        before, after = self.family.mlp_norms
        out = layer.mlp(getattr(layer, before)(h))
        return out if after is None else getattr(layer, after)(out)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.final_norm(h))  # [B, T, D] -> [B, T, V]
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap


def _no_derived(weights) -> None:
    if weights is not None:
        raise UnsupportedModelError("low-bit drafts run on the fused backend only")


def adapter_for(model: PreTrainedModel) -> Adapter:
    """The adapter for `model`, or a clear error naming what is supported."""
    family = family_of(model.config)
    attn = model.config._attn_implementation
    if attn not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(
            f"attention implementation {attn!r} is not supported; load the model with "
            f"attn_implementation='sdpa' (or 'eager')"
        )
    return Adapter(model, family)
