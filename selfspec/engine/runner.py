"""Runs spans of a model's layers over the shared cache, skipping whichever sublayers it is told to.

Both the draft (shallow, skipping) and the verify pass (the remaining layers, all sublayers) go through
`Runner.layers`, so the two differ only in which layers and sublayers run.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .adapter import Adapter
from .cache import PositionedCache
from .span import Span, causal_mask


@dataclass(frozen=True)
class Plan:
    """How a forward runs each sublayer: skipped (the residual passes through), over derived low-bit weights
    (layer -> `FusedLayer`), or exactly as the model does (the rest)."""

    skip_attn: frozenset[int] = frozenset()
    skip_mlp: frozenset[int] = frozenset()
    attn_weights: Mapping[int, object] = field(default_factory=dict)
    mlp_weights: Mapping[int, object] = field(default_factory=dict)


EXACT = Plan()


def compiled_pass_fits(position: int, width: int, cache_length: int) -> bool:
    """Whether a compiled pass of `width` tokens at `position` runs over a cache of `cache_length` positions. The
    graphs take the key length as a symbol: a length of 1 (position 0), or one equal to the buffer's (keys
    contiguous), would each be traced as a special case, another graph; such passes run eager."""
    return 0 < position and position + width < cache_length


class Runner:
    def __init__(self, adapter: Adapter, cache: PositionedCache, compiled=None):
        self.adapter = adapter
        self.cache = cache
        self.compiled = compiled  # `CompiledPasses`: which full-depth passes run compiled; None: all eager

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.cache_device)
        return self.adapter.embed(ids)  # [1, T, D]

    @property
    def cache_device(self) -> torch.device:
        return self.adapter.lm_head.weight.device

    def span(self, h: torch.Tensor, start: int) -> Span:
        """Prepare a forward over positions [start, start + T) for hidden states h [1, T, D]."""
        count = h.shape[1]
        visible = start + count
        if visible > self.cache.max_len:
            raise RuntimeError(f"position {visible} is past the cache length {self.cache.max_len}")
        positions = torch.arange(start, visible, device=h.device)
        self.cache.write_at(positions, visible)
        rope = self.adapter.position_embeddings(h, positions)
        mask = causal_mask(start, count, visible, self.adapter.attn_implementation, h.device, h.dtype)
        return Span(start, count, positions, visible, rope, mask)

    def layers(
        self,
        h: torch.Tensor,
        span: Span,
        first: int,
        stop: int,
        plan: Plan = EXACT,
    ) -> torch.Tensor:
        """Run layers [first, stop) on h [1, T, D] as `plan` says."""
        for i in range(first, stop):
            if i not in plan.skip_attn:
                h = h + self.adapter.attention(i, h, span, self.cache, plan.attn_weights.get(i))
            if i not in plan.skip_mlp:
                h = h + self.adapter.mlp(i, h, plan.mlp_weights.get(i))
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter.logits(h)  # [1, T, V]

    def verify(self, states: torch.Tensor, position: int, first: int) -> torch.Tensor:
        """Logits [T, V] of layers [first, L) and the head over states [1, T, D] at positions [position, +T)."""
        width = states.shape[1]
        bucket = self.compiled.bucket(width) if self.compiled is not None and first == 0 else None
        if bucket is not None and compiled_pass_fits(position, bucket, self.cache.max_len):
            if bucket > width:  # rows past the draft: their logits are dropped, their K/V overwritten before read
                states = torch.cat([states, states[:, -1:].expand(-1, bucket - width, -1)], dim=1)  # [1, bucket, D]
            logits = self.compiled.run(states, position, self.cache.key_buffers(), self.cache.value_buffers())
            return logits[0, :width]
        h = self.layers(states, self.span(states, position), first, self.adapter.num_layers)
        return self.logits(h)[0]
