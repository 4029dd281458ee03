"""What one forward over consecutive positions shares across its layers: the positions, the rotary embeddings, and
the attention masks, the causal one and each sliding window's.

A query at position q reads keys [0, q]; a layer with a sliding window of W reads keys (q - W, q] only, as the
model's own sliding-window mask says. The fused forward slices such a layer's keys to the ones some query of the
span can see, so a one-token step reads W keys and needs no mask at all, whatever the cache length.
"""

from dataclasses import dataclass, field

import torch


@dataclass
class Span:
    """Positions [start, start + count); inside a compiled graph `start` is None, `positions` a traced tensor and
    `visible` a symbolic size."""

    start: int | None
    count: int
    positions: torch.Tensor  # [T]
    visible: int  # the forward may read keys [0, visible)
    rope: dict  # the family's rope key -> (cos, sin), each [1, T, head_dim]
    mask: torch.Tensor | None  # [1, 1, T, visible] (see `causal_mask`); None: one token, or an sdpa causal prefill
    _windows: dict = field(default_factory=dict, repr=False)

    def sliding(self, size: int) -> tuple[int, torch.Tensor | None]:
        """For a sliding window of `size`: the first key any query of the span may read, and the boolean mask over
        keys [first, visible), [1, 1, T, visible - first] (None: every one of them is visible to every query)."""
        if size not in self._windows:
            first = torch.sym_max(0, self.visible - self.count - size + 1)
            if self.count == 1 or (self.mask is None and self.visible <= size):
                mask = None  # one token sees exactly its window; a causal prefill within the window, all before it
            else:
                keys = torch.arange(first, self.visible, device=self.positions.device)
                queries = self.positions[:, None]
                mask = ((keys[None, :] <= queries) & (keys[None, :] > queries - size))[None, None]
            self._windows[size] = first, mask
        return self._windows[size]

    def sliding_full_width(self, size: int, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor | None:
        """The same window as a mask over every visible key, of the kind `causal_mask` makes: what the model's own
        attention modules take (the reference path), which read the whole cache."""
        if self.visible <= size:
            return self.mask  # the window cuts nothing off yet
        key = ("full width", size)
        if key not in self._windows:
            keys = torch.arange(self.visible, device=self.positions.device)
            queries = self.positions[:, None]
            allowed = (keys[None, :] <= queries) & (keys[None, :] > queries - size)  # [T, visible]
            self._windows[key] = _as_mask(allowed, attn_implementation, dtype)
        return self._windows[key]


def causal_mask(
    start: int, count: int, visible: int, attn_implementation: str, device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    """Mask for `count` queries at positions [start, start+count) over keys [0, visible): [1, 1, count, visible].

    None where the attention needs no explicit mask: a one-token step that reads every visible key, or an
    sdpa prefill from position 0 (its `is_causal` path). That is what `model.generate` passes in those cases,
    so both take the same attention kernel and round alike.
    """
    last = start + count - 1
    if last == visible - 1 and (count == 1 or (start == 0 and attn_implementation == "sdpa")):
        return None
    keys = torch.arange(visible, device=device)
    queries = torch.arange(start, start + count, device=device)
    return _as_mask(keys[None, :] <= queries[:, None], attn_implementation, dtype)  # [count, visible]


def _as_mask(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """[T, S] booleans as sdpa takes them, or as the additive float mask eager attention adds: [1, 1, T, S]."""
    if attn_implementation == "sdpa":
        return allowed[None, None]
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    blocked.masked_fill_(~allowed, torch.finfo(dtype).min)
    return blocked[None, None]
