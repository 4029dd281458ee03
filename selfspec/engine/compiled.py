"""The one-token decode step as one compiled function (torch.compile, inductor), used where it measured faster.

Eager decoding pays a dispatch per op (norms, rotary, attention, cache writes, residual adds) and at batch 1 on a
small model that overhead rivals streaming the weights; compiled, the elementwise work fuses into a few loops.
The matrix products stay the fused forward's own kernels (oneDNN's packed bf16 where the CPU has it), called by
handle through one custom op, or our few-row kernel's op on its matrix's number; so the graph holds no weights:
inductor's on-disk caches (kept under the selfspec cache) then serve a second process, which pays a few seconds of
tracing instead of the compile.

The step is capture-ready: the position is a tensor, the cache write happens inside the graph at that position,
nothing syncs with the host, and the one size that changes between calls is the key length it reads.
"""

import hashlib
import json
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..cpu import machine_key
from ..files import write_json_atomic
from ..paths import cache_root
from ..zoo import first_line
from .cache import PositionedCache
from .fused import FusedAdapter
from .runner import EXACT, Plan, Runner
from .span import Span

RECORD_VERSION = 4
# Verify widths with a graph of their own; a full-depth pass of another width is padded up to the next one, and
# a wider one runs eager. Not only doublings: a pass costs about the same from 1 to 6 tokens and then climbs
# (qwen2.5-coder-0.5b, bf16, compiled, a 2-core Xeon: 67, 73, 78, 94, 116, 141 ms for 1, 4, 6, 8, 12 and 16
# tokens), so padding 5 tokens to 8, or 9 to 16, paid for rows nobody reads.
BUCKETS = (1, 2, 4, 6, 8, 12, 16)
TIMED_STEPS = 8  # per round of an eager-or-compiled measurement
TIMED_ROUNDS = 6
TIMED_KEYS = 256  # the key length the measurement runs at: a typical prompt plus part of a reply
# Processes that time a choice before it holds, the choice taken on their mean: on a shared machine the same
# measurement in two processes has come out 25% apart either way (qwen2.5-coder-0.5b's int4 draft step: 27.7 ms
# compiled / 22.2 eager in one, 24.5 / 28.2 in another), and one unlucky process should not decide for good.
RECORD_SAMPLES = 3
# Room for every model, dtype and bucket a process compiles (dynamo's default is 8 graphs a function, then eager).
RECOMPILE_LIMIT = 64


def bucket_for(width: int) -> int | None:
    return next((bucket for bucket in BUCKETS if bucket >= width), None)


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
    """Every layer and the LM head for h [1, T, D] at positions [T] -> logits [1, T, V].

    keys/values are the whole per-layer buffers [1, H_kv, S, hd]; the step reads their first n positions, n being
    key_range's length [n]: a size the graph takes as a symbol, so one graph serves every position and cache length
    (views sliced outside would carry the buffer's length in their strides, and a view that happened to be the
    whole buffer would be traced as contiguous, a second graph)."""
    runner, span = _static_runner(adapter, h, positions, keys, values, key_range)
    return runner.logits(runner.layers(h, span, 0, adapter.num_layers, EXACT))


def draft_layers(
    adapter: FusedAdapter,
    plan: Plan,
    first: int,
    stop: int,
    h: torch.Tensor,
    positions: torch.Tensor,
    keys: list,
    values: list,
    key_range: torch.Tensor,
) -> torch.Tensor:
    """Layers [first, stop) as the draft's plan runs them, for one token h [1, 1, D] -> [1, 1, D]; the cache as in
    `full_step`."""
    runner, span = _static_runner(adapter, h, positions, keys, values, key_range)
    return runner.layers(h, span, first, stop, plan)


def _static_runner(adapter: FusedAdapter, h, positions, keys, values, key_range) -> tuple[Runner, Span]:
    visible = key_range.shape[0]
    cache = StaticKV([k[:, :, :visible] for k in keys], [v[:, :, :visible] for v in values], positions)
    rope = adapter.position_embeddings(h, positions)
    mask = None
    if h.shape[1] > 1:
        keys_at = torch.arange(visible, device=h.device)
        mask = (keys_at[None, :] <= positions[:, None])[None, None]  # [1, 1, T, visible]
    return Runner(adapter, cache), Span(None, h.shape[1], positions, visible, rope, mask)


def _compiled(function: types.FunctionType, owner: object) -> Callable:
    """`function` compiled for one owner (an adapter, a drafter): a copy of its own, since dynamo keys graphs by
    code object, with the guards on the owner's objects dropped (~1,700 of them, a millisecond a call), as they
    never change; the inputs stay guarded."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    own = _function_copy(function, f"{function.__name__}_{id(owner):x}")
    return torch.compile(
        own,
        fullgraph=True,
        dynamic=False,
        options={"guard_filter_fn": _input_guards, "emulate_precision_casts": True},
    )


def _static_inputs(h: torch.Tensor, position: int, keys: list, values: list) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] and key_range [position + T] for h [1, T, D]; the buffers' length marked as a symbol."""
    for t in keys + values:
        if not hasattr(t, "_dynamo_dynamic_indices"):
            torch._dynamo.mark_dynamic(t, 2)
    width = h.shape[1]
    key_range = torch.empty(position + width, dtype=torch.int8, device=h.device)
    torch._dynamo.mark_dynamic(key_range, 0)
    return torch.arange(position, position + width, device=h.device), key_range


def _timed(call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """call()'s result and its seconds: a graph's first call, which compiles it or loads it from disk."""
    started = time.perf_counter()
    out = call()
    return out, time.perf_counter() - started


class CompiledStep:
    """`full_step` compiled for one adapter, a graph per bucket width; `run` takes the eager loop's cache."""

    def __init__(self, adapter: FusedAdapter):
        self.adapter = adapter
        self.compile_seconds: dict[int, float] = {}  # bucket -> its first call (a compile, or a load from disk)
        self._step = _compiled(full_step, adapter)

    def run(self, h: torch.Tensor, position: int, keys: list, values: list) -> torch.Tensor:
        """Logits [1, T, V] for h [1, T, D] (T a bucket) at positions [position, +T); keys/values: the full per-layer
        buffers, which must hold more than position + T positions."""
        positions, key_range = _static_inputs(h, position, keys, values)
        call = partial(self._step, self.adapter, h, positions, keys, values, key_range)
        width = h.shape[1]
        if width in self.compile_seconds:
            return call()
        logits, self.compile_seconds[width] = _timed(call)
        return logits


class CompiledSegment:
    """`draft_layers` compiled for one drafter's plan and layer range: its one-token draft step without the
    eager dispatch per op (the draft head, whose rows change with each prompt, stays eager)."""

    def __init__(self, adapter: FusedAdapter, plan: Plan, first: int, stop: int):
        self.adapter, self.plan, self.first, self.stop = adapter, plan, first, stop
        self.compile_seconds: float | None = None
        self._layers = _compiled(draft_layers, self)

    def run(self, h: torch.Tensor, position: int, keys: list, values: list) -> torch.Tensor:
        """h [1, 1, D] after layers [first, stop) at `position`."""
        positions, key_range = _static_inputs(h, position, keys, values)
        call = partial(
            self._layers, self.adapter, self.plan, self.first, self.stop, h, positions, keys, values, key_range
        )
        if self.compile_seconds is not None:
            return call()
        out, self.compile_seconds = _timed(call)
        return out


class CompiledPasses:
    """Which full-depth passes a decode runs compiled: every bucket (mode "compiled"), or those measured faster
    than eager on this machine ("auto")."""

    def __init__(self, step: CompiledStep, wins: dict[int, bool] | None = None):
        self.step = step
        self.wins = wins  # bucket -> compiled measured faster; None: every bucket compiled

    def bucket(self, width: int) -> int | None:
        """The bucket a pass of `width` tokens runs compiled in, or None (eager)."""
        bucket = bucket_for(width)
        if bucket is None or self.wins is None:
            return bucket
        return bucket if self.wins.get(bucket) else None

    def run(self, h: torch.Tensor, position: int, keys: list, values: list) -> torch.Tensor:
        """Logits [1, T, V] of the bucket-wide h [1, T, D]."""
        return self.step.run(h, position, keys, values)

    def draft_segment(self, plan: Plan, first: int, stop: int) -> "CompiledSegment | None":
        """The draft's layers [first, stop) compiled, or None where eager measured faster (see `decode_step`). One
        graph per adapter and plan, kept with the adapter: each generate makes a new drafter."""
        adapter = self.step.adapter
        digest = _plan_digest(plan, first, stop)
        segments = adapter.derived.setdefault("draft segments", {})
        if digest not in segments:
            segments[digest] = CompiledSegment(adapter, plan, first, stop)
        if self.wins is None:
            return segments[digest]
        chosen = adapter.derived.setdefault("draft segments chosen", {})
        if digest not in chosen:
            timing = {1: (f"draft step over layers {first}-{stop - 1}", partial(measure_segment, segments[digest]))}
            chosen[digest] = sampled_records(record_path(adapter, "draft-" + digest), timing)[1].compiled_wins
        return segments[digest] if chosen[digest] else None


def _plan_digest(plan: Plan, first: int, stop: int) -> str:
    """What the draft runs in layers [first, stop): per sublayer skipped, exact, or a low-bit scheme and the
    kernel that runs it (a graph traces some kernels and calls others by handle: not the same graph to time)."""

    def form(i: int, skipped: frozenset, weights) -> str:
        if i in skipped:
            return "skip"
        derived = weights.get(i)
        return "exact" if derived is None else f"{derived.qkv.matrix.scheme} {derived.qkv.kernel}"

    forms = [(form(i, plan.skip_attn, plan.attn_weights), form(i, plan.skip_mlp, plan.mlp_weights))
             for i in range(first, stop)]  # fmt: skip
    return hashlib.sha256(json.dumps([first, stop, forms]).encode()).hexdigest()[:12]


def _function_copy(function: types.FunctionType, name: str) -> types.FunctionType:
    """The same function over a code object of its own: dynamo keys its compiled graphs by code object."""
    code = function.__code__.replace(co_name=name)
    return types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)


def _input_guards(entries: list) -> list[bool]:
    return [not (entry.name.startswith(("adapter", "plan")) or entry.is_global) for entry in entries]


@dataclass
class StepRecord:
    """What the first uses on this machine measured for one bucket: pass times, eager and compiled (each the mean
    over `samples` processes), and the first compile."""

    eager_ms: float
    compiled_ms: float | None  # None: it did not compile here
    compile_seconds: float
    samples: int = 1

    @property
    def compiled_wins(self) -> bool:
        return self.compiled_ms is not None and self.compiled_ms < self.eager_ms

    @property
    def settled(self) -> bool:
        """Whether the choice holds without another process's sample (one that did not compile never will)."""
        return self.compiled_ms is None or self.samples >= RECORD_SAMPLES

    def with_sample(self, new: "StepRecord") -> "StepRecord":
        if new.compiled_ms is None:  # (an unsettled record compiled: see `settled`)
            return new
        n = self.samples
        return StepRecord((self.eager_ms * n + new.eager_ms) / (n + 1), (self.compiled_ms * n + new.compiled_ms) / (n + 1),
                          self.compile_seconds, n + 1)  # fmt: skip


def record_path(adapter: FusedAdapter, what: str = "passes") -> Path:
    """Where the measurements of `what` for this model, dtype, CPU, kernels, thread count and torch version are
    kept."""
    dtype = str(adapter.lm_head.weight.dtype).removeprefix("torch.")
    # the passes our few-row kernel serves are other graphs (`FusedAdapter.few_rows`, timed in each process)
    machine = json.dumps(machine_key() | {"few_rows": adapter.few_rows}, sort_keys=True)
    key = hashlib.sha256(machine.encode()).hexdigest()[:12]
    name = f"{adapter.fingerprint}-{dtype}-{key}-{what}-v{RECORD_VERSION}.json"
    return cache_root() / "steps" / name


def write_records(path: Path, records: dict[int, StepRecord]) -> None:
    write_json_atomic(path, {str(width): r.__dict__ | {"compiled_wins": r.compiled_wins}
                             for width, r in sorted(records.items())})  # fmt: skip


def load_records(path: Path) -> dict[int, StepRecord]:
    """bucket -> its record; a missing or damaged file reads as nothing measured."""
    try:
        data = json.loads(path.read_text())
        return {int(width): _record_of(entry) for width, entry in data.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _record_of(entry: dict) -> StepRecord:
    compiled = entry["compiled_ms"]
    return StepRecord(float(entry["eager_ms"]), None if compiled is None else float(compiled),
                      float(entry["compile_seconds"]), int(entry.get("samples", 1)))  # fmt: skip


_sampled_here: set[tuple[Path, int]] = set()  # (record file, bucket) this process has timed: one sample a process


def sampled_records(path: Path, timing: dict[int, tuple[str, Callable[[], StepRecord]]]) -> dict[int, StepRecord]:
    """The records kept at `path`, where each bucket of `timing` (bucket -> what it times, how) has been timed in
    this process if its record still wants a sample."""
    records = load_records(path)
    for bucket, (what, measure_it) in timing.items():
        record = records.get(bucket)
        if (record is not None and record.settled) or (path, bucket) in _sampled_here:
            continue
        _sampled_here.add((path, bucket))
        sample = _measured(what, measure_it, 1 if record is None else record.samples + 1)
        records[bucket] = sample if record is None else record.with_sample(sample)
        _say_choice(what, sample, records[bucket])
        write_records(path, records)
    return records


@torch.inference_mode()
def measure(adapter: FusedAdapter, width: int = 1, compiled: bool = True) -> StepRecord:
    """Time the compiled pass of `width` (a bucket) against the eager one on a scratch cache; the graph timed is
    the adapter's own, the one decoding will run. compiled False: the eager pass alone, nothing compiled."""
    cache = scratch_cache(adapter, TIMED_KEYS + TIMED_STEPS + width)
    ids = torch.zeros(1, width, dtype=torch.long, device=adapter.lm_head.weight.device)
    h = adapter.embed(ids)  # [1, width, D]
    eager = Runner(adapter, cache)
    if not compiled:
        return StepRecord(_best_ms({"eager": lambda p: eager.verify(h, p, 0)})["eager"], None, 0.0)
    step = compiled_step(adapter)
    graph = Runner(adapter, cache, CompiledPasses(step))
    graph.verify(h, TIMED_KEYS, 0)  # compiles, or loads the compile from inductor's cache
    ms = _best_ms({"eager": lambda p: eager.verify(h, p, 0), "compiled": lambda p: graph.verify(h, p, 0)})
    return StepRecord(ms["eager"], ms["compiled"], step.compile_seconds[width])


@torch.inference_mode()
def measure_segment(segment: CompiledSegment) -> StepRecord:
    """Time the compiled draft layers against the eager ones, one token at a time, on a scratch cache."""
    adapter = segment.adapter
    cache = scratch_cache(adapter, TIMED_KEYS + TIMED_STEPS + 1)
    runner, keys, values = Runner(adapter, cache), cache.key_buffers(), cache.value_buffers()
    h = adapter.embed(torch.zeros(1, 1, dtype=torch.long, device=adapter.lm_head.weight.device))  # [1, 1, D]
    segment.run(h, TIMED_KEYS, keys, values)  # compiles, or loads the compile from inductor's cache

    def eager(position: int) -> torch.Tensor:
        return runner.layers(h, runner.span(h, position), segment.first, segment.stop, segment.plan)

    ms = _best_ms({"eager": eager, "compiled": lambda p: segment.run(h, p, keys, values)})
    return StepRecord(ms["eager"], ms["compiled"], segment.compile_seconds)


def _best_ms(calls: dict[str, Callable[[int], object]]) -> dict[str, float]:
    """Each call's best time (ms) over rounds of TIMED_STEPS positions, the calls taking turns round by round."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(TIMED_ROUNDS):
        for name, call in calls.items():
            started = time.perf_counter()
            for i in range(TIMED_STEPS):
                call(TIMED_KEYS + i)
            best[name] = min(best[name], (time.perf_counter() - started) / TIMED_STEPS)
    return {name: 1e3 * seconds for name, seconds in best.items()}


def scratch_cache(adapter: FusedAdapter, length: int) -> PositionedCache:
    cache = PositionedCache(adapter.num_layers, length)
    cache.allocate(adapter.config, adapter.lm_head.weight.dtype, adapter.lm_head.weight.device)
    return cache


def compiled_step(adapter: FusedAdapter) -> CompiledStep:
    if "step" not in adapter.derived:
        adapter.derived["step"] = CompiledStep(adapter)
    return adapter.derived["step"]


def decode_step(adapter: FusedAdapter, mode: str, max_width: int = 1) -> CompiledPasses | None:
    """The compiled passes a decode runs, or None for all eager. mode "compiled" compiles every bucket, and the
    draft's layers, as first needed; "auto" compiles the buckets up to `max_width`, and the draft's layers, where
    that measured faster than eager on this machine (timed in each of the first RECORD_SAMPLES processes to use a
    bucket or draft plan, kept on disk beside the zoo cache, and said on stderr, since a first timing pays a
    compile)."""
    if mode == "eager":
        return None
    if mode == "compiled":
        return CompiledPasses(compiled_step(adapter))
    wins = adapter.derived.setdefault("pass wins", {})  # read from disk once per adapter, not at every generate
    needed = BUCKETS[: BUCKETS.index(bucket_for(min(max_width, BUCKETS[-1]))) + 1]
    if any(bucket not in wins for bucket in needed):
        timing = {
            b: ("decode step" if b == 1 else f"{b}-token verify pass", partial(measure, adapter, b)) for b in needed
        }
        records = sampled_records(record_path(adapter), timing)
        wins.update({bucket: record.compiled_wins for bucket, record in records.items()})
    return CompiledPasses(compiled_step(adapter), wins)


def _measured(what: str, measure_it: Callable[[], StepRecord], sample: int) -> StepRecord:
    print(f"selfspec: timing the compiled {what} against eager for this model, dtype and machine (process "
          f"{sample} of the first {RECORD_SAMPLES}) ...", file=sys.stderr)  # fmt: skip
    try:
        record = measure_it()
    except Exception as e:  # noqa: BLE001 - no compiler, or an op inductor cannot lower: eager is always there
        print(f"selfspec: the {what} did not compile ({first_line(e)}); eager", file=sys.stderr)
        return StepRecord(eager_ms=0.0, compiled_ms=None, compile_seconds=0.0)
    return record


def _say_choice(what: str, sample: StepRecord, record: StepRecord) -> None:
    """This process's timing and the choice it leaves; nothing where it did not compile (`_measured` said so)."""
    if record.compiled_ms is None:
        return
    print(f"selfspec: compiled in {sample.compile_seconds:.0f} s; the {what} took {sample.compiled_ms:.2f} ms compiled, "
          f"{sample.eager_ms:.2f} ms eager here; mean of {record.samples} process(es) {record.compiled_ms:.2f} / "
          f"{record.eager_ms:.2f} ms: {'compiled' if record.compiled_wins else 'eager'}", file=sys.stderr)  # fmt: skip


def step_line(adapter: FusedAdapter) -> str:
    """What the compiled passes measured here, for bench's output."""
    records = load_records(record_path(adapter))
    if not records:
        return "compiled passes: not measured on this machine yet (wrap measures them at the first generate)"
    step = adapter.derived.get("step")
    parts = []
    for width, record in sorted(records.items()):
        if record.compiled_ms is None:
            parts.append(f"{width}: did not compile")
            continue
        loaded = step.compile_seconds.get(width) if step else None
        took = f"; this process loaded it in {loaded:.1f} s" if loaded else ""
        parts.append(
            f"{width}: {record.compiled_ms:.1f} compiled / {record.eager_ms:.1f} eager "
            f"(first compile {record.compile_seconds:.0f} s{took}; {record.samples} process(es)) -> "
            f"{'compiled' if record.compiled_wins else 'eager'}"
        )
    return "full-depth passes by width, ms, measured here: " + "; ".join(parts)
