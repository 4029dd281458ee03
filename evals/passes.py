"""`selfspec bench MODEL --passes`: what a full-depth pass costs at each verify width, and a layer draft's step,
against the one-token step and against physics.

At batch 1 a pass streams every weight once whatever its width; the rows only add arithmetic. So a pass should cost
about one step until the arithmetic binds: its floor is the larger of the weight bytes over the read bandwidth and
its multiply-adds at the CPU's measured peak. Leviathan's v (a verify pass in steps) and c (a draft step in steps)
are the ratios this prints.
"""

import time
from dataclasses import asdict, dataclass

import torch
from rich.table import Table
from transformers import PreTrainedModel

from selfspec import SpeculativeModel
from selfspec.engine.compiled import BUCKETS, measure
from selfspec.engine.fused import FusedAdapter, engine_adapter

from .floor import draft_weight_bytes, step_weight_bytes

PEAK_SIZE = 1024  # a square product this size is bound by arithmetic, not memory, on any CPU it runs on


@dataclass
class PassCost:
    width: int
    eager_ms: float
    compiled_ms: float | None  # None: not compiled (SELFSPEC_DECODE_STEP=eager)
    kernel: str  # which matrix kernel served the pass's products
    floor_ms: float  # max(weight bytes / read bandwidth, multiply-adds / peak)

    @property
    def ms(self) -> float:
        """What decoding pays: the faster of eager and compiled."""
        return min(self.eager_ms, self.compiled_ms or float("inf"))


def peak_flops(dtype: torch.dtype) -> float:
    """Multiply-adds x 2 per second of torch's own dense product in `dtype`, best of a few."""
    a = torch.randn(PEAK_SIZE, PEAK_SIZE).to(dtype)
    a @ a  # first call: kernel choice and packing
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - started)
    return 2 * PEAK_SIZE**3 / best


def kernel_for(adapter: FusedAdapter, width: int) -> str:
    if width <= adapter.few_rows:
        return "few-row kernel"
    return "oneDNN packed" if adapter.head.packed else "F.linear"


def pass_costs(model: PreTrainedModel, bandwidth: float, peak: float, compiled: bool) -> list[PassCost]:
    """Every verify bucket's full-depth pass, timed as `selfspec.engine.compiled.measure` times it (256 keys)."""
    adapter = engine_adapter(model)
    weights = step_weight_bytes(model)
    parameters = weights / model.lm_head.weight.element_size()
    costs = []
    for width in BUCKETS:
        record = measure(adapter, width, compiled)
        floor = max(weights / bandwidth, 2 * parameters * width / peak)
        costs.append(PassCost(width, record.eager_ms, record.compiled_ms, kernel_for(adapter, width), 1e3 * floor))
    return costs


def draft_step(fast: SpeculativeModel, input_ids: torch.Tensor, tokens: int) -> float:
    """A layer draft's step in ms as decoding runs it (compiled plans included), from one greedy generation."""
    fast.generate(input_ids, max_new_tokens=tokens, do_sample=False)  # warm-up: plans built, graphs loaded
    fast.generate(input_ids, max_new_tokens=tokens, do_sample=False)
    return 1e3 * fast.last_stats.layer_draft_step_seconds


def passes_table(costs: list[PassCost], draft_ms: float | None, draft_floor_ms: float | None) -> Table:
    step = costs[0].ms
    table = Table(title="full-depth passes by width (and the layer draft's step) against the one-token step",
                  caption="floor: max(weight bytes / read bandwidth, 2 x parameters x width / measured peak)")  # fmt: skip
    for column in ("pass", "eager ms", "compiled ms", "× step", "kernel", "floor ms", "× floor"):
        table.add_column(column, justify="left" if column in ("pass", "kernel") else "right")
    for c in costs:
        compiled = "-" if c.compiled_ms is None else f"{c.compiled_ms:.2f}"
        table.add_row(f"width {c.width}", f"{c.eager_ms:.2f}", compiled, f"{c.ms / step:.2f}", c.kernel,
                      f"{c.floor_ms:.2f}", f"{c.ms / c.floor_ms:.2f}")  # fmt: skip
    if draft_ms is not None:
        table.add_row("layer draft step", "", "", f"{draft_ms / step:.2f}", "", f"{draft_floor_ms:.2f}",
                      f"{draft_ms / draft_floor_ms:.2f}", style="bold")  # fmt: skip
    return table


def passes_json(costs: list[PassCost], draft_ms: float | None, model: PreTrainedModel, fast: SpeculativeModel,
                bandwidth: float, peak: float) -> dict:  # fmt: skip
    return {
        "passes": {str(c.width): c.ms for c in costs},
        "step_ms": costs[0].ms,
        "draft_ms": draft_ms,
        "draft_bytes": draft_weight_bytes(model, fast.schedule) if draft_ms is not None else None,
        "step_bytes": step_weight_bytes(model),
        "read_bandwidth_gbs": bandwidth / 1e9,
        "peak_gflops": peak / 1e9,
        "details": [asdict(c) | {"ms": c.ms} for c in costs],
    }
