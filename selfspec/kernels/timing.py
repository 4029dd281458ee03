"""How kernels are timed against each other: as a decode step streams them, every call in a row, best of a few
such passes (the first pays page faults and warm-up)."""

import time
from collections.abc import Callable

import torch

TIMED_PASSES = 5


def best_pass_seconds(calls: list[tuple[Callable, torch.Tensor]], device: torch.device | None = None) -> float:
    """Seconds of the fastest of TIMED_PASSES + 1 passes, each running every call on its input; a CUDA device is
    synchronised before each pass's clock stops."""
    best = float("inf")
    for _ in range(TIMED_PASSES + 1):
        started = time.perf_counter()
        for run, x in calls:
            run(x)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best
