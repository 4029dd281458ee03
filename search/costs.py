"""What each part of a decoding round costs on this device, measured once with the engine's own Runner.

The surrogate prices a candidate schedule from these parts instead of timing it: a draft step is the
embedding, the sublayers it keeps and the LM head; a verify pass is the layers after the draft's exact
prefix over every drafted token plus one.

Sublayers are timed one by one, eagerly, but decoding runs its full-depth passes and its draft's layers as
compiled graphs where those measured faster (`selfspec.compiled`), which changes what pays: compiled, the plain
step sheds more per-op overhead than a low-bit draft does. So full-depth passes are timed as decoding runs them,
and each sublayer form (exact, or a low-bit scheme) gets the ratio its compiled draft layers measured to eager.
"""

import itertools
import statistics
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property, partial

import torch
from transformers import PreTrainedModel

from selfspec.drafts import draft_plan
from selfspec.drafts.head import DraftHead
from selfspec.drafts.lowbit import SCHEMES, draft_weights
from selfspec.engine.compiled import bucket_for, decode_step, scratch_cache
from selfspec.engine.fused import FusedAdapter, engine_adapter
from selfspec.engine.runner import Runner
from selfspec.schedule import Schedule
from selfspec.wrap import step_mode

HEAD_VOCABS = (0, 4096, 8192, 16384, 32768)  # draft-head sizes priced (0: every token); larger ones are not cheap


def head_key(precision: str, vocab: int) -> str:
    return f"{precision}/{vocab}"


@dataclass(frozen=True)
class Costs:
    """Seconds at batch 1 with `kv_length` cached positions."""

    kv_length: int
    fixed: float  # embedding plus the per-call setup (positions, rotary, mask)
    attn: tuple[float, ...]  # [L] one token through layer i's attention sublayer
    mlp: tuple[float, ...]  # [L]
    # head_key(precision, vocab) -> the draft head (final norm + LM head over `vocab` tokens, 0: all) and the
    # annealed softmax the draft reads its confidence from
    draft_heads: dict[str, float]
    verify: tuple[float, ...]  # verify[k - 1]: k tokens through every layer, the LM head and argmax, eager
    verify_head: tuple[float, ...]  # verify_head[k - 1]: final norm + LM head + argmax for k tokens
    # scheme -> [L] one token through layer i's sublayer over low-bit weights (empty: no low-bit drafts here)
    attn_lowbit: dict[str, tuple[float, ...]] = field(default_factory=dict)
    mlp_lowbit: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # full_verify[k - 1]: as `verify`, run as decoding runs a pass from layer 0 (a compiled graph per width bucket
    # where that measured faster); empty where decoding runs eager, and in studies made before it was measured
    full_verify: tuple[float, ...] = ()
    # form (exact or a scheme) -> a draft's layers of that form run as decoding runs them, over the same run eager
    # (below 1 where their compiled graph won); a form missing here runs eager
    draft_speed: dict[str, float] = field(default_factory=dict)

    @property
    def step(self) -> float:
        """One token through the whole model: the plain loop's round."""
        return self.full_verify[0] if self.full_verify else self.verify[0]

    @property
    def head(self) -> float:
        return self.verify_head[0]

    @property
    def num_layers(self) -> int:
        return len(self.attn)

    @property
    def max_verify_tokens(self) -> int:
        return len(self.verify)

    @cached_property
    def _overhead(self) -> float:
        # Residual adds and call overhead that timing sublayers one by one misses, spread evenly over them,
        # so a draft that keeps everything costs exactly a measured step plus its softmax.
        parts = self.fixed + sum(self.attn) + sum(self.mlp) + self.head
        return max(0.0, self.verify[0] - parts) / (2 * self.num_layers)

    @property
    def schemes(self) -> tuple[str, ...]:
        """Low-bit schemes measured on this device."""
        return tuple(self.attn_lowbit)

    @property
    def head_vocabs(self) -> tuple[int, ...]:
        return tuple(sorted({int(key.split("/")[1]) for key in self.draft_heads}))

    def sublayer(self, kind: str, layer: int, form: str) -> float:
        """One token through a sublayer (attn or mlp) run as `form`: skip, exact, int8 or int4."""
        if form == "skip":
            return 0.0
        table = getattr(self, kind) if form == "exact" else getattr(self, f"{kind}_lowbit")[form]
        return (table[layer] + self._overhead) * self.draft_speed.get(form, 1.0)

    def prefix(self, depth: int, schedule: Schedule | None = None) -> float:
        """One token through layers [0, depth) as the schedule's layer draft runs them (exactly: None), no head."""
        form = schedule.sublayer_form if schedule is not None else lambda kind, i: "exact"
        return self.fixed + sum(self.sublayer(kind, i, form(kind, i)) for i in range(depth) for kind in ("attn", "mlp"))

    def draft_head(self, precision: str = "exact", vocab: int = 0) -> float:
        """The draft head's cost, priced at the smallest measured size that holds `vocab` tokens."""
        sizes = [v for v in self.head_vocabs if v >= vocab and v > 0] if vocab else [0]
        return self.draft_heads[head_key(precision, min(sizes, default=0))]

    def draft_step(self, exit_layer: int, schedule: Schedule) -> float:
        return self.prefix(exit_layer, schedule) + self.draft_head(schedule.head_precision, schedule.head_vocab)

    def verify_pass(self, tokens: int, start: int) -> float:
        """`tokens` tokens through layers [start, L) and the LM head.

        From layer 0 it is the pass as decoding runs it. From a later layer (always eager) the layers' share of
        a measured k-token pass is scaled by the share of one-token layer time past `start`; per-sublayer
        timings at every k would cost far more to measure for little gain.
        """
        k = min(tokens, self.max_verify_tokens) - 1
        scale = tokens / (k + 1)  # past the measured range, grow linearly
        if start == 0 and self.full_verify:
            return scale * self.full_verify[k]
        layers = self.verify[k] - self.verify_head[k]
        total = self.prefix(self.num_layers) - self.fixed
        rest = total - (self.prefix(start) - self.fixed)
        return scale * (layers * rest / total + self.verify_head[k])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Costs":
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        for name in ("attn_lowbit", "mlp_lowbit"):
            values[name] = {scheme: tuple(t) for scheme, t in values.get(name, {}).items()}
        return cls(**values)


def _medians(probes: dict[Hashable, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[Hashable, float]:
    """Median seconds of each probe, timed round-robin: on a shared machine a slow spell then lands on all
    probes alike instead of on whichever ran during it, which would skew their ratios."""
    for probe in probes.values():
        for _ in range(warmup):
            probe()
    times: dict[Hashable, list[float]] = {key: [] for key in probes}
    for _ in range(repeats):
        for key, probe in probes.items():
            started = time.perf_counter()
            probe()
            times[key].append(time.perf_counter() - started)
    return {key: statistics.median(t) for key, t in times.items()}


@torch.inference_mode()
def measure_costs(
    model: PreTrainedModel, kv_length: int = 256, max_tokens: int = 9, repeats: int = 9, mode: str | None = None
) -> Costs:
    """Time the parts of a round on `model`'s device; `max_tokens` bounds the verify widths measured. `mode`: how
    decoding runs its passes (eager, compiled, auto; None: as `wrap` would)."""
    adapter = engine_adapter(model)
    num_layers = adapter.num_layers
    fused = isinstance(adapter, FusedAdapter)
    mode = step_mode("auto") if mode is None else mode
    compiled = decode_step(adapter, mode, max_tokens) if fused and mode != "eager" else None
    # room past the context for the widest bucket: a compiled pass never reads the whole buffer
    cache = scratch_cache(adapter, kv_length + (bucket_for(max_tokens) or max_tokens) + 1)
    runner, decoding = Runner(adapter, cache), Runner(adapter, cache, compiled)
    context = [i % adapter.embed_tokens.num_embeddings for i in range(kv_length)]
    h = runner.embed(context)
    runner.layers(h, runner.span(h, 0), 0, num_layers)  # fill the cache: steps attend over kv_length keys
    one = runner.embed(context[:1])  # [1, 1, D]
    span = runner.span(one, kv_length)
    span_positions = runner.cache.positions

    def full_pass(runner: Runner, tokens: int) -> torch.Tensor:
        return runner.verify(runner.embed(context[:tokens]), kv_length, 0).argmax(-1)

    def head(tokens: int) -> torch.Tensor:
        return runner.logits(one.expand(1, tokens, -1))[0].argmax(-1)

    def draft_head(head: DraftHead) -> torch.Tensor:
        _, scores, place = head.top(one)  # as a draft token chooses, then reads its confidence
        return torch.softmax(scores.float() / 1.5, dim=-1)[place]

    def attention(i: int, weights=None) -> torch.Tensor:
        runner.cache.write_at(span_positions, kv_length + 1)  # the probe before may have moved them
        return adapter.attention(i, one, span, runner.cache, weights)

    schemes = SCHEMES if fused else ()
    vocab_size = adapter.lm_head.weight.shape[0]
    heads = {
        head_key(p, v): DraftHead(adapter, Schedule(head_precision=p, head_vocab=v))
        for p in ("exact", *schemes)
        for v in HEAD_VOCABS
        if v < vocab_size
    }

    widths = range(1, max_tokens + 1)
    probes: dict[Hashable, Callable[[], object]] = {"fixed": lambda: runner.span(runner.embed(context[:1]), kv_length)}
    probes |= {("attn", i): partial(attention, i) for i in range(num_layers)}
    probes |= {("mlp", i): partial(adapter.mlp, i, one) for i in range(num_layers)}
    probes |= {("head", key): partial(draft_head, head) for key, head in heads.items()}
    for scheme in schemes:
        layers = draft_weights(adapter, scheme).layers
        probes |= {(scheme, "attn", i): partial(attention, i, layers[i]) for i in range(num_layers)}
        probes |= {(scheme, "mlp", i): partial(adapter.mlp, i, one, layers[i]) for i in range(num_layers)}
    probes |= {("verify", k): partial(full_pass, runner, k) for k in widths}
    probes |= {("verify_head", k): partial(head, k) for k in widths}
    if compiled is not None:
        probes |= {("full_verify", k): partial(full_pass, decoding, k) for k in widths}
        probes |= _draft_probes(decoding, one, kv_length, ("exact", *schemes))
    t = _medians(probes, repeats)
    return Costs(
        kv_length=kv_length,
        fixed=t["fixed"],
        attn=tuple(t["attn", i] for i in range(num_layers)),
        mlp=tuple(t["mlp", i] for i in range(num_layers)),
        draft_heads={key: t["head", key] for key in heads},
        verify=_rising(t["verify", k] for k in widths),
        verify_head=_rising(t["verify_head", k] for k in widths),
        attn_lowbit={s: tuple(t[s, "attn", i] for i in range(num_layers)) for s in schemes},
        mlp_lowbit={s: tuple(t[s, "mlp", i] for i in range(num_layers)) for s in schemes},
        full_verify=_rising(t["full_verify", k] for k in widths) if compiled is not None else (),
        draft_speed={
            form: t["draft", form, "as decoding"] / t["draft", form, "eager"]
            for form in ("exact", *schemes)
            if ("draft", form, "eager") in t
        },  # fmt: skip
    )


def _draft_probes(
    decoding: Runner, one: torch.Tensor, position: int, forms: tuple[str, ...]
) -> dict[Hashable, Callable[[], object]]:
    """For each sublayer form, one token through a draft whose every layer runs in that form: as decoding runs it
    (its compiled graph, where auto measured that faster) and eager. Forms whose graph lost to eager are left out:
    decoding runs them eager."""
    adapter, cache = decoding.adapter, decoding.cache
    probes: dict[Hashable, Callable[[], object]] = {}
    for form in forms:
        every = tuple(range(adapter.num_layers))
        lowbit = {} if form == "exact" else {f"{form}_attn": every, f"{form}_mlp": every}
        plan = draft_plan(decoding, Schedule(**lowbit, max_draft=1))
        segment = decoding.compiled.draft_segment(plan, 0, adapter.num_layers)
        if segment is None:
            continue
        keys, values = cache.key_buffers(), cache.value_buffers()
        probes["draft", form, "as decoding"] = partial(segment.run, one, position, keys, values)
        probes["draft", form, "eager"] = lambda plan=plan: decoding.layers(
            one, decoding.span(one, position), 0, adapter.num_layers, plan
        )
    return probes


def _rising(times: Iterable[float]) -> tuple[float, ...]:
    # More tokens never cost less; a dip is timing noise and would reward wide drafts for nothing.
    return tuple(itertools.accumulate(times, max))
