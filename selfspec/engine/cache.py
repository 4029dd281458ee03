"""One static, position-indexed KV cache shared by the draft and the verify pass.

Every forward call names the positions it writes (`cache.write_at`). Entries are written in place at those
positions; a rejected draft is never rolled back, its entries are simply overwritten by the next write at
the same positions and, until then, hidden by the causal mask (a query at position p reads keys [0, p]).
The class plugs into transformers' `Cache` interface, so the model's own attention modules read and write it.
"""

import torch
from transformers.cache_utils import Cache, StaticLayer


class _PositionedLayer(StaticLayer):
    """A StaticLayer that writes at the cache's current positions instead of its own running counter."""

    def __init__(self, max_cache_len: int, owner: "PositionedCache"):
        super().__init__(max_cache_len=max_cache_len)
        self.owner = owner

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = self.owner.positions  # [T]
        self.keys.index_copy_(2, positions, key_states)  # keys: [B, H_kv, S, head_dim]
        self.values.index_copy_(2, positions, value_states)
        n = self.owner.visible
        if n is None:
            return self.keys, self.values
        return self.keys[:, :, :n], self.values[:, :, :n]

    def get_seq_length(self) -> int:
        return self.owner.visible or 0


class PositionedCache(Cache):
    """KV storage for `num_layers` layers and `max_len` positions, written at caller-chosen positions."""

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.positions = torch.zeros(0, dtype=torch.long)
        # Keys past `visible` are never attended to in this call, so attention reads only [0, visible).
        self.visible: int | None = None
        super().__init__(layers=[_PositionedLayer(max_len, self) for _ in range(num_layers)])

    def allocate(self, config, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate every layer's [1, H_kv, max_len, head_dim] buffers now (a compiled step writes into them, so
        they must exist before the first eager write would make them)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (1, config.num_key_value_heads, 1, head_dim)
        for layer in self.layers:
            if not layer.is_initialized:
                layer.lazy_initialization(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype,
                                          device=device))  # fmt: skip

    def key_buffers(self) -> list[torch.Tensor]:
        return [layer.keys for layer in self.layers]  # each [1, H_kv, max_len, head_dim]

    def value_buffers(self) -> list[torch.Tensor]:
        return [layer.values for layer in self.layers]

    def write_at(self, positions: torch.Tensor, visible: int | None) -> None:
        """Set where the next forward writes (positions [T]) and how many key positions it may read."""
        self.positions = positions
        self.visible = visible
