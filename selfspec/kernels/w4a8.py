"""An int4 draft kernel of our own: int4 weight codes against activations rounded to int8 per group of 32, in
integer dot products (`csrc/w4a8.cpp`). torch's int4 kernel converts every code to a float before it
multiplies, which on a two-core CPU costs more than streaming the bytes; integer dot products keep up with them.

Built for this CPU on first use (`selfspec.native`).
"""

import functools

import torch
import torch.nn.functional as F

from .native import built

BLOCK_ROWS = 16  # output rows per block of the packed layout: one per 32-bit lane of a 512-bit register


def load_library() -> None:
    """Make torch.ops.selfspec_w4a8 available, or raise NotImplementedError saying why it cannot be here."""
    failure = _built()
    if failure:
        raise NotImplementedError(f"the w4a8 kernel could not be built here: {failure}")


@functools.cache
def _built() -> str:
    failure = built("w4a8")
    if not failure:
        torch.library.register_fake("selfspec_w4a8::linear", _output_shape)
    return failure


def _output_shape(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)  # what a compiled graph traces the kernel as


def pack(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes int [N, K] (0..15), scales and mins float [N, K / 32] -> the kernel's layout (see csrc/w4a8.cpp):
    uint8 [N' / 16, K / 8, 64] and float16 [N' / 16, K / 32, 2, 16], N' the rows padded to a block."""
    rows, width = codes.shape
    padding = (0, 0, 0, -rows % BLOCK_ROWS)
    codes = F.pad(codes.to(torch.uint8), padding)
    nibbles = codes.view(-1, BLOCK_ROWS, width // 8, 2, 4)  # block, row, 8 inputs, low/high nibble, input
    packed = (nibbles[..., 0, :] | nibbles[..., 1, :] << 4).permute(0, 2, 1, 3)  # [blocks, K / 8, 16, 4]
    groups = torch.stack([F.pad(scales.float(), padding), F.pad(mins.float(), padding)], dim=1)  # [N', 2, K/32]
    groups = groups.view(-1, BLOCK_ROWS, 2, width // 32).permute(0, 3, 2, 1)  # [blocks, K / 32, 2, 16]
    return packed.reshape(-1, width // 8, 64).contiguous(), groups.to(torch.float16).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [M, K] -> [M, out_features], in x's dtype."""
    return torch.ops.selfspec_w4a8.linear(x, packed, scales, out_features)
