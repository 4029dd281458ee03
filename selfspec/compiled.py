"""The one-token decode step as one compiled function (torch.compile, inductor), used where it measured faster.

Eager decoding pays a dispatch per op (norms, rotary, attention, cache writes, residual adds) and at batch 1 on a
small model that overhead rivals streaming the weights; compiled, the elementwise work fuses into a few loops.
The matrix products stay the fused forward's own kernels (oneDNN's packed bf16 where the CPU has it), called by
handle through one custom op, so the graph holds no weights: inductor's on-disk caches (kept under the selfspec
cache) then serve a second process, which pays a few seconds of tracing instead of the compile.

The step is capture-ready: the position is a tensor, the cache write happens inside the graph at that position,
nothing syncs with the host, and the one size that changes between calls is the key length it reads.
"""

import hashlib
import json
import os
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import PositionedCache
from .cpu import cpu_flags
from .files import write_json_atomic
from .fingerprint import model_fingerprint
from .fused import FusedAdapter
from .runner import EXACT, Runner, Span
from .zoo import cache_root, first_line

RECORD_VERSION = 3
TIMED_STEPS = 8  # per round of the eager-or-compiled measurement
TIMED_ROUNDS = 6
TIMED_KEYS = 256  # the key length the measurement runs at: a typical prompt plus part of a reply
# Room for every model and dtype a process compiles (dynamo's default is 8 graphs a function, then eager).
RECOMPILE_LIMIT = 64


@dataclass
class StaticKV:
    """The cache as the compiled step sees it: per layer a [1, H_kv, S, hd] view over positions [0, S), written
    at `positions` (a tensor) inside the graph."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor  # [T]

    def update(self, k: torch.Tensor, v: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[i].index_copy_(2, self.positions, k)
        self.values[i].index_copy_(2, self.positions, v)
        return self.keys[i], self.values[i]


def full_step(
    adapter: FusedAdapter, h: torch.Tensor, positions: torch.Tensor, keys: list, values: list, key_range: torch.Tensor
) -> torch.Tensor:
    """Every layer and the LM head for one token h [1, 1, D] at positions [1] -> logits [1, 1, V].

    keys/values are the whole per-layer buffers [1, H_kv, S, hd]; the step reads their first n positions, n being
    key_range's length [n]: a size the graph takes as a symbol, so one graph serves every position and cache length
    (views sliced outside would carry the buffer's length in their strides, and a view that happened to be the
    whole buffer would be traced as contiguous, a second graph)."""
    visible = key_range.shape[0]
    cache = StaticKV([k[:, :, :visible] for k in keys], [v[:, :, :visible] for v in values], positions)
    runner = Runner(adapter, cache)
    rope = adapter.position_embeddings(h, positions)
    span = Span(0, 1, rope, None)
    return runner.logits(runner.layers(h, span, 0, adapter.num_layers, EXACT))


class CompiledStep:
    """`full_step` compiled for one adapter; `run` takes the eager loop's cache and position."""

    def __init__(self, adapter: FusedAdapter):
        self.adapter = adapter
        self.compile_seconds: float | None = None
        use_selfspec_inductor_cache()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        # Guards on the adapter's objects (~1,700 of them, a millisecond a call) are dropped: a copy of the function
        # per adapter keeps each graph to its own adapter, whose objects never change; the inputs stay guarded.
        own = _function_copy(full_step, f"full_step_{id(adapter):x}")
        self._step = torch.compile(
            own,
            fullgraph=True,
            dynamic=False,
            options={"guard_filter_fn": _input_guards, "emulate_precision_casts": True},
        )

    def run(self, h: torch.Tensor, position: int, keys: list, values: list) -> torch.Tensor:
        """Logits [1, 1, V] for h [1, 1, D] at `position`; keys/values: the full per-layer buffers."""
        for t in keys + values:
            if not hasattr(t, "_dynamo_dynamic_indices"):
                torch._dynamo.mark_dynamic(t, 2)
        key_range = torch.empty(position + 1, dtype=torch.int8, device=h.device)
        torch._dynamo.mark_dynamic(key_range, 0)
        positions = torch.tensor([position], device=h.device)
        if self.compile_seconds is not None:
            return self._step(self.adapter, h, positions, keys, values, key_range)
        started = time.perf_counter()
        logits = self._step(self.adapter, h, positions, keys, values, key_range)
        self.compile_seconds = time.perf_counter() - started
        return logits


def _function_copy(function: types.FunctionType, name: str) -> types.FunctionType:
    """The same function over a code object of its own: dynamo keys its compiled graphs by code object."""
    code = function.__code__.replace(co_name=name)
    return types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)


def _input_guards(entries: list) -> list[bool]:
    return [not (entry.name.startswith("adapter") or entry.is_global) for entry in entries]


def use_selfspec_inductor_cache() -> None:
    """Inductor's FX-graph and AOT caches under the selfspec cache (not /tmp), unless the user chose a place."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


@dataclass
class StepRecord:
    """What the first use on this machine measured: one-token step times, eager and compiled, and the compile."""

    eager_ms: float
    compiled_ms: float | None  # None: it did not compile here
    compile_seconds: float

    @property
    def compiled_wins(self) -> bool:
        return self.compiled_ms is not None and self.compiled_ms < self.eager_ms


def record_path(adapter: FusedAdapter) -> Path:
    """Where the measurement for this model, dtype, CPU, thread count and torch version is kept."""
    dtype = str(adapter.lm_head.weight.dtype).removeprefix("torch.")
    machine = f"{cpu_flags()}|{torch.__version__}|{torch.get_num_threads()} threads"
    key = hashlib.sha256(machine.encode()).hexdigest()[:12]
    return cache_root() / "steps" / f"{model_fingerprint(adapter.model)}-{dtype}-{key}-v{RECORD_VERSION}.json"


def load_record(path: Path) -> StepRecord | None:
    try:
        data = json.loads(path.read_text())
        compiled = data["compiled_ms"]
        return StepRecord(float(data["eager_ms"]), None if compiled is None else float(compiled),
                          float(data["compile_seconds"]))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):  # missing or damaged: measured again
        return None


@torch.inference_mode()
def measure(adapter: FusedAdapter) -> tuple[StepRecord, CompiledStep]:
    """Compile the step, then time it against the eager step on a scratch cache, alternating rounds."""
    cache = scratch_cache(adapter, TIMED_KEYS + TIMED_STEPS + 1)
    compiled = adapter.derived.get("step") or CompiledStep(adapter)  # one graph per adapter, timed as it will run
    eager, graph = Runner(adapter, cache), Runner(adapter, cache, compiled)
    h = adapter.embed(torch.zeros(1, 1, dtype=torch.long, device=adapter.lm_head.weight.device))  # [1, 1, D]
    graph.verify(h, TIMED_KEYS, 0)  # compiles, or loads the compile from inductor's cache
    best = {eager: float("inf"), graph: float("inf")}
    for _ in range(TIMED_ROUNDS):
        for runner in best:
            started = time.perf_counter()
            for i in range(TIMED_STEPS):
                runner.verify(h, TIMED_KEYS + i, 0)
            best[runner] = min(best[runner], (time.perf_counter() - started) / TIMED_STEPS)
    return StepRecord(1e3 * best[eager], 1e3 * best[graph], compiled.compile_seconds), compiled


def scratch_cache(adapter: FusedAdapter, length: int) -> PositionedCache:
    cache = PositionedCache(adapter.num_layers, length)
    cache.allocate(adapter.model.config, adapter.lm_head.weight.dtype, adapter.lm_head.weight.device)
    return cache


def decode_step(adapter: FusedAdapter, mode: str) -> CompiledStep | None:
    """The compiled step the engine runs one-token passes with, or None for eager. mode "compiled" always compiles;
    "auto" compiles where that measured faster than eager on this machine (measured once, kept on disk beside
    the zoo cache, and said on stderr, since the first measurement pays a compile)."""
    if mode == "eager":
        return None
    if mode == "compiled":
        if "step" not in adapter.derived:
            adapter.derived["step"] = CompiledStep(adapter)
        return adapter.derived["step"]
    if "step wins" not in adapter.derived:
        adapter.derived["step wins"] = _compiled_wins(adapter)
    return decode_step(adapter, "compiled") if adapter.derived["step wins"] else None


def _compiled_wins(adapter: FusedAdapter) -> bool:
    path = record_path(adapter)
    record = load_record(path)
    if record is not None:
        return record.compiled_wins
    print("selfspec: timing the compiled decode step against eager for this model, dtype and machine (once) ...",
          file=sys.stderr)  # fmt: skip
    try:
        record, adapter.derived["step"] = measure(adapter)
    except Exception as e:  # noqa: BLE001 - no compiler, or an op inductor cannot lower: eager is always there
        print(f"selfspec: the decode step did not compile ({first_line(e)}); decoding eager", file=sys.stderr)
        record = StepRecord(eager_ms=0.0, compiled_ms=None, compile_seconds=0.0)
    write_json_atomic(path, record.__dict__ | {"compiled_wins": record.compiled_wins})
    if record.compiled_ms is not None:
        print(
            f"selfspec: compiled in {record.compile_seconds:.0f} s; a step takes {record.compiled_ms:.1f} ms compiled, "
            f"{record.eager_ms:.1f} ms eager: decoding {'compiled' if record.compiled_wins else 'eager'}",
            file=sys.stderr,
        )
    return record.compiled_wins


def step_line(adapter: FusedAdapter) -> str:
    """What the one-token step measured here, for bench's output."""
    record = load_record(record_path(adapter))
    if record is None:
        return "decode step: not measured on this machine yet (wrap measures it at the first generate)"
    if record.compiled_ms is None:
        return "decode step: eager (it did not compile here)"
    compiled = adapter.derived.get("step")
    loaded = (
        f"; this process loaded it in {compiled.compile_seconds:.1f} s" if compiled and compiled.compile_seconds else ""
    )
    return (
        f"decode step, measured once here: compiled {record.compiled_ms:.1f} ms, eager {record.eager_ms:.1f} ms; "
        f"first compile {record.compile_seconds:.0f} s{loaded}; wrap decodes "
        f"{'compiled' if record.compiled_wins else 'eager'}"
    )
