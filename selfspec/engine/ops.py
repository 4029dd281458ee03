"""The fused forward's shared pieces of arithmetic: rotary embeddings and attention over the cache."""

import torch
import torch.nn.functional as F


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """SDPA over the cache; q [B, H, T, hd], keys/values [B, H_kv, S, hd] -> [B, H, T, hd].

    Outside a causal prefill, the query heads that share a K/V head are stacked as rows of that head
    ([B, H_kv, G * T, hd], the mask repeated per head): the same products as `enable_gqa`, which on CPU runs a
    decode step's attention several times slower (465 vs 73 µs over 1024 keys, smollm2's shapes).
    """
    batch, heads, count, dim = q.shape
    if mask is None and count > 1:
        return F.scaled_dot_product_attention(q, keys, values, scale=scale, is_causal=True, enable_gqa=True)
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    rows = q.reshape(batch, kv_heads, groups * count, dim)
    if mask is not None:  # [1, 1, T, S] -> [1, 1, G * T, S]
        mask = mask.expand(-1, groups, -1, -1).reshape(mask.shape[0], 1, groups * count, -1)
    out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, scale=scale)
    return out.view(batch, heads, count, dim)
