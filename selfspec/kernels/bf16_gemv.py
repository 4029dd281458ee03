"""The exact bfloat16 product for a few input rows, our own (`csrc/bf16_gemv.cpp`): AVX-512 bf16 dot products (or
AVX2 FMAs on a CPU without them) over weights in 2 MB pages, which at one row stream the weights faster than
oneDNN's packed kernels (those win from a few rows on, on AMX most of all) or `F.linear`. It is a copy of the
weights in its own layout, kept only for the row counts where `rows_it_wins` measured it faster on this machine.

Built for this CPU on first use (`selfspec.native`). The products are the same sums in another order, rounded
once to bfloat16: float32 models never take this path.
"""

import functools
import os
import weakref
from collections.abc import Callable

import torch

from .native import built
from .timing import best_pass_seconds

# Set to 0 to keep the fused forward on oneDNN's kernels or F.linear at every width.
ENABLED_ENV = "SELFSPEC_FEW_ROW_KERNEL"
TIMED_ROWS = (1, 2, 4, 8, 16)  # a decode step and the verify passes, up to the widest bucket
# The kernel also serves every wider input, and the other kernel's copy of the weights is dropped, where at every
# verify width and at a prompt's (one layer's matrices) it is at most WIDE_ENOUGH times slower than that kernel:
# on an AMD EPYC Zen 5 it ran qwen2.5-coder-1.5b's first layers at 128 rows in 60.6 ms against oneDNN's 53.4, where
# keeping oneDNN's copy cost 3.1 GB; on AMX, oneDNN is several times faster there and keeps its copy.
PROMPT_ROWS = 128
WIDE_ENOUGH = 1.25
EVERY_ROW = 1 << 30  # `rows_it_wins`'s answer where the kernel takes inputs of any width


def wanted() -> bool:
    """Whether the kernel may run: it is available and SELFSPEC_FEW_ROW_KERNEL is not 0."""
    return os.environ.get(ENABLED_ENV, "1") != "0" and available()


@functools.cache
def available() -> bool:
    """Whether the kernel runs here: it built, with AVX-512 bf16 or AVX2 code (see `isa`)."""
    if built("bf16_gemv") or not isa():
        return False
    torch.library.register_fake("selfspec_bf16::gemv", _output_shape)
    return True


def isa() -> str:
    """The instructions the build multiplies with: "avx512_bf16", "avx2", or "" (none)."""
    return torch.ops.selfspec_bf16.isa()


def _output_shape(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)  # what a compiled graph traces the kernel as


class Gemv:
    """One [N, K] bfloat16 matrix (and bias) in the kernel's layout: x [..., K] -> [..., N]. A compiled graph calls
    the op by the matrix's handle, so it holds no weights."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.handle = torch.ops.selfspec_bf16.register_matrix(weight.detach(), bias)
        self.out_features = weight.shape[0]
        release = weakref.finalize(self, torch.ops.selfspec_bf16.release_matrix, self.handle)
        release.atexit = False  # the process's memory goes with it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.selfspec_bf16.gemv(x, self.handle, self.out_features)


def rows_it_wins(
    products: list[tuple[Callable, Callable, int]], layer: int = 4
) -> tuple[int, dict[int, tuple[float, float]]]:
    """Up to how many input rows the kernel beats the other one over `products` (ours, theirs, K), each pass over
    all of them in a row as a decode step streams them, timed from one row up until it loses; or EVERY_ROW where it
    is close enough at every timed width and at PROMPT_ROWS over the first `layer` products. And per row count
    timed (ours, theirs) seconds, best of a few."""
    times: dict[int, tuple[float, float]] = {}
    wins, lost = 0, False
    for rows in TIMED_ROWS:
        ours, theirs = times[rows] = _pass_pair(products, rows)
        if ours > WIDE_ENOUGH * theirs or (rows == 1 and ours >= theirs):
            return wins, times
        lost = lost or ours >= theirs
        wins = wins if lost else rows
    ours, theirs = times[PROMPT_ROWS] = _pass_pair(products[:layer], PROMPT_ROWS)
    return (EVERY_ROW if ours <= WIDE_ENOUGH * theirs else wins), times


def _pass_pair(products: list[tuple[Callable, Callable, int]], rows: int) -> tuple[float, float]:
    inputs = {k: torch.randn(1, rows, k, dtype=torch.bfloat16) for _, _, k in products}
    ours = best_pass_seconds([(run, inputs[k]) for run, _, k in products])
    return ours, best_pass_seconds([(run, inputs[k]) for _, run, k in products])
