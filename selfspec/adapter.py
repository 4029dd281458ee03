"""Per-architecture access to a causal LM's parts: embedding, sublayers, final norm, LM head.

The engine never forks transformers' modeling code: it calls the model's own modules (norms, attention with
its attention interface, MLP) one sublayer at a time, which is what lets a draft skip a sublayer or stop
early while the verify pass runs the very same code as `model.generate`.
"""

from dataclasses import InitVar, dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from .errors import UnsupportedModelError

# Pre-norm decoders whose layer is `h += attn(norm1(h)); h += mlp(norm2(h))` with rotary positions.
PRE_NORM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class Adapter:
    """How to run one sublayer of a supported model; holds references to its modules, never copies of weights,
    and not the model itself: the engine keeps its adapters in a dictionary keyed weakly by the model, which a
    reference back to the model would keep alive for good (with every derived weight)."""

    model: InitVar[PreTrainedModel]
    family: str

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

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # [B, T] -> [B, T, D]

    def position_embeddings(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(h, positions.unsqueeze(0))  # cos, sin: [1, T, head_dim]

    def attention(self, i: int, h: torch.Tensor, rope, mask, cache, weights=None) -> torch.Tensor:
        """The residual update of layer i's attention sublayer; writes the layer's K/V into `cache`.

        `weights` (derived low-bit weights) exist only for the fused forward (`selfspec.fused`)."""
        _no_derived(weights)
        layer = self.layers[i]
        out, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(h),
            position_embeddings=rope,
            attention_mask=mask,
            past_key_values=cache,
        )
        return out

    def mlp(self, i: int, h: torch.Tensor, weights=None) -> torch.Tensor:
        _no_derived(weights)
        layer = self.layers[i]
        return layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(h))  # [B, T, D] -> [B, T, V]


def _no_derived(weights) -> None:
    if weights is not None:
        raise UnsupportedModelError("low-bit drafts run on the fused backend only (llama, mistral, qwen2)")


def adapter_for(model: PreTrainedModel) -> Adapter:
    """The adapter for `model`, or a clear error naming what is supported."""
    family = getattr(model.config, "model_type", None)
    if family not in PRE_NORM_FAMILIES:
        raise UnsupportedModelError(
            f"architecture {family!r} is not supported; supported: {', '.join(PRE_NORM_FAMILIES)}"
        )
    attn = model.config._attn_implementation
    if attn not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(
            f"attention implementation {attn!r} is not supported; load the model with "
            f"attn_implementation='sdpa' (or 'eager')"
        )
    layer_types = getattr(model.config, "layer_types", None) or ()
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(
            "sliding-window or hybrid attention layers are not supported yet; use a model with full attention"
        )
    return Adapter(model, family)
