"""Drafting policies, one class each behind one interface: given the pending token, propose what follows.

Interface: `begin(prompt)` once per sequence, `draft(pending, position, room, sampler, eos) -> Draft` each
round (at most `room` proposals), then `record(draft, emitted, kept, seconds)` with the round's outcome.
A `Draft` carries the proposals and the hidden states the verify pass starts from, so whatever the draft
already computed exactly (its layers before the first skipped sublayer or exit) is never computed again.
"""

from dataclasses import dataclass

import torch

from .adapter import Adapter
from .draft_head import DraftHead
from .errors import UnsupportedModelError
from .fused import FusedAdapter
from .lowbit import draft_weights
from .ngram import NgramIndex
from .runner import Plan, Runner, compiled_pass_fits
from .sampling import Sampler
from .schedule import Schedule

# Why a round stopped drafting.
STOP_WIDTH, STOP_CONFIDENCE, STOP_DEPTH, STOP_EOS, STOP_NONE = "width", "confidence", "depth", "eos", "no_draft"
STOP_CONTEXT_END = "context_end"  # the copied span ran out before the width bound
# Where a round's proposals came from.
SOURCE_PLAIN, SOURCE_LAYER, SOURCE_CONTEXT = "plain", "layer", "context"


@dataclass
class Draft:
    proposals: list[int]  # drafted tokens, in order
    inputs: list[int]  # tokens the verify pass feeds: the pending token, then proposals (maybe all but the last)
    states: torch.Tensor  # [1, len(inputs), D]: hidden states of `inputs` entering layer `verify_start`
    verify_start: int
    stop_reason: str
    draft_probs: torch.Tensor | None = None  # [len(proposals), V] when sampling
    source: str = SOURCE_PLAIN
    steps: int = 0  # draft forwards run (a layer draft runs one per token it looked at)


class Width:
    """Tokens to draft next round: fixed, or grown after full acceptance and shrunk after a miss."""

    def __init__(self, bound: int, adaptive: bool):
        self.bound, self.adaptive = bound, adaptive
        self.current = bound

    def update(self, drafted: int, accepted: int) -> None:
        if not self.adaptive or drafted == 0:
            return
        step = 2 if accepted == drafted else -1
        self.current = max(1, min(self.bound, self.current + step))


class PlainDrafter:
    """Drafting off: every round feeds the pending token through the whole model."""

    def __init__(self, runner: Runner):
        self.runner = runner

    def begin(self, prompt: list[int]) -> None:
        pass

    def draft(self, pending: int, position: int, room: int, sampler: Sampler, eos: set[int]) -> Draft:
        return Draft([], [pending], self.runner.embed([pending]), 0, STOP_NONE)

    def record(self, draft: Draft, emitted: list[int], kept: int, seconds: float) -> None:
        pass


def prepare_drafts(adapter: Adapter, schedule: Schedule) -> None:
    """Build the derived weights the schedule's layer draft runs (once per model), or refuse an adapter that has
    none: low-bit weights exist for the fused forward only."""
    if schedule.max_draft == 0:
        return
    schemes = schedule.lowbit_schemes
    if schemes and not isinstance(adapter, FusedAdapter):
        raise UnsupportedModelError("low-bit drafts run on the fused backend only (llama, mistral, qwen2)")
    for scheme in sorted(schemes):
        draft_weights(adapter, scheme)


def draft_plan(runner: Runner, schedule: Schedule) -> Plan:
    """The schedule's skipped sublayers, and its low-bit ones over the model's derived weights."""
    prepare_drafts(runner.adapter, schedule)
    weights: dict[str, dict[int, object]] = {"attn": {}, "mlp": {}}
    for scheme in schedule.body_schemes:
        layers = draft_weights(runner.adapter, scheme).layers
        for kind in weights:
            weights[kind] |= {i: layers[i] for i in getattr(schedule, f"{scheme}_{kind}")}
    return Plan(frozenset(schedule.skip_attn), frozenset(schedule.skip_mlp), weights["attn"], weights["mlp"])


class LayerDrafter:
    """The model itself, run shallower or lighter: skipped sublayers, low-bit sublayers, a cheap LM head, and/or
    an exit, fixed or per token (dynamic exit).

    Confidence is the probability of the drafted token under softmax(logits / T_l), T_l = 1 + a (1 - l / L),
    l the draft's effective depth: shallow drafts are overconfident, so they must be surer to go on.
    """

    def __init__(self, runner: Runner, schedule: Schedule):
        self.runner = runner
        self.schedule = schedule
        num_layers = runner.adapter.num_layers
        self.num_layers = num_layers
        self.plan = draft_plan(runner, schedule)
        self.skip_attn, self.skip_mlp = self.plan.skip_attn, self.plan.skip_mlp
        self.head = DraftHead(runner.adapter, schedule)
        all_exits = schedule.exits(num_layers)
        depth_cap = schedule.max_depth or num_layers
        self.exits = tuple(e for e in all_exits if e <= depth_cap)
        self.deeper_exits_cut = len(self.exits) < len(all_exits)
        first_inexact = min(schedule.inexact_layers, default=num_layers)
        # Up to this depth the draft computes exactly what the full model does, so its states are reusable.
        self.exact_depth = min(first_inexact, self.exits[-1])
        self.checkpoints = sorted({e for e in self.exits if e < self.exact_depth} | {self.exact_depth})
        self.boundaries = sorted(set(self.checkpoints) | set(self.exits))  # where a draft step stops to look
        self.temperatures = {e: self._temperature(e) for e in self.exits}
        self.width = Width(schedule.max_draft, schedule.adaptive_width)
        self.segments = self._compiled_segments()

    def _compiled_segments(self) -> dict:
        """(first, stop) -> the compiled draft layers between two of its boundaries, where the runner compiles."""
        compiled = self.runner.compiled
        if compiled is None:
            return {}
        bounds = [0, *self.boundaries]
        pairs = [(first, stop) for first, stop in zip(bounds, bounds[1:]) if first < stop]
        segments = {pair: compiled.draft_segment(self.plan, *pair) for pair in pairs}
        return {pair: segment for pair, segment in segments.items() if segment is not None}

    def _layers(self, h: torch.Tensor, span, first: int, stop: int) -> torch.Tensor:
        segment = self.segments.get((first, stop))
        cache = self.runner.cache
        if segment is not None and compiled_pass_fits(span.start, 1, cache.max_len):
            return segment.run(h, span.start, cache.key_buffers(), cache.value_buffers())
        return self.runner.layers(h, span, first, stop, self.plan)

    def begin(self, prompt: list[int]) -> None:
        self.head.begin(prompt)

    def record(self, draft: Draft, emitted: list[int], kept: int, seconds: float) -> None:
        self.width.update(len(draft.proposals), kept)

    def _temperature(self, exit_layer: int) -> float:
        skipped_sublayers = sum(i < exit_layer for i in self.skip_attn) + sum(i < exit_layer for i in self.skip_mlp)
        effective_depth = exit_layer - skipped_sublayers / 2
        return 1.0 + self.schedule.anneal * (1.0 - effective_depth / self.num_layers)

    def _confidence(self, scores: torch.Tensor, exit_layer: int, place: int) -> float:
        """The drafted token's probability under the exit's annealed softmax; scores [S] hold it at `place` (tokens
        the head does not score would add nothing to the softmax: their logits are -inf)."""
        return float(torch.softmax(scores.float() / self.temperatures[exit_layer], dim=-1)[place])

    def draft(self, pending: int, position: int, room: int, sampler: Sampler, eos: set[int]) -> Draft:
        width = min(self.width.current, room)
        inputs, proposals, saved, reached, probs = [pending], [], [], [], []
        reason = STOP_WIDTH
        while len(proposals) < width:
            token, confident, prob, depth_states, depth = self._step(inputs[-1], position + len(inputs) - 1, sampler)
            saved.append(depth_states)
            reached.append(depth)
            # An unsure token is still proposed, only the round ends there: its draft step is already paid, and
            # one more verified position costs far less than the step it saves whenever the model agrees.
            proposals.append(token)
            probs.append(prob)
            if token in eos:
                reason = STOP_EOS
                break
            inputs.append(token)
            if not confident:
                reason = STOP_DEPTH if self.deeper_exits_cut else STOP_CONFIDENCE
                break
        verify_start = min(reached)
        states = [s[verify_start] for s in saved]  # each [1, 1, D]
        if len(states) < len(inputs):
            # The last proposal was never fed: bring it to verify_start (only the layers below it) so the
            # verify pass also scores what follows it, and a fully accepted round still gains a bonus token.
            h = self.runner.embed([inputs[-1]])
            span = self.runner.span(h, position + len(inputs) - 1)
            states.append(self.runner.layers(h, span, 0, verify_start))
        draft_probs = torch.stack(probs) if sampler.do_sample and probs else None
        states = torch.cat(states, dim=1)
        return Draft(proposals, inputs, states, verify_start, reason, draft_probs, SOURCE_LAYER, len(saved))

    def _step(self, token: int, position: int, sampler: Sampler):
        """One draft token: run to the first exit where it is confident (or the last allowed exit)."""
        h = self.runner.embed([token])
        span = self.runner.span(h, position)
        depth_states = {0: h}
        layer = 0
        for boundary in self.boundaries:
            h = self._layers(h, span, layer, boundary)
            layer = boundary
            if boundary in self.checkpoints:
                depth_states[boundary] = h
            if boundary not in self.exits:
                continue
            if sampler.do_sample:
                scores = self.head(h)[0, -1]  # [V]
                q = sampler.probs(scores[None])[0]
                choice = place = int(sampler.sample(q[None])[0])
            else:
                q, (choice, scores, place) = None, self.head.top(h)  # scores [S]: the tokens the head scores
            floor = self.schedule.confidence
            confident = floor <= 0 or self._confidence(scores, boundary, place) >= floor  # no floor, no softmax
            if confident or boundary == self.exits[-1]:
                depth = min(boundary, self.exact_depth)
                return choice, confident, q, depth_states, depth
        raise AssertionError("unreachable: the last exit always returns")


class ContextDrafter:
    """Copies what followed the latest earlier occurrence of the sequence's tail n-gram: a draft that runs no
    layer at all, so its only cost is the wider verify pass. The index sees every emitted token, whichever
    source drafted it. The width is fixed: a copy that goes wrong costs only a few more verified positions,
    and shrinking after a miss would cut short the long spans (quotes, code, repeated lines) that pay most.
    """

    def __init__(self, runner: Runner, schedule: Schedule):
        self.runner = runner
        self.schedule = schedule
        self.index = NgramIndex(schedule.context_min_ngram, schedule.context_ngram)

    def begin(self, prompt: list[int]) -> None:
        self.index = NgramIndex(self.schedule.context_min_ngram, self.schedule.context_ngram)
        self.index.extend(prompt)

    def draft(self, pending: int, position: int, room: int, sampler: Sampler, eos: set[int]) -> Draft | None:
        """The copied proposals, or None when the tail has no earlier occurrence."""
        width = min(self.schedule.context_max_draft, room)
        proposals = self.index.propose(width)
        if not proposals:
            return None
        reason = STOP_WIDTH if len(proposals) == width else STOP_CONTEXT_END
        ends = [i for i, token in enumerate(proposals) if token in eos]
        if ends:
            proposals, reason = proposals[: ends[0] + 1], STOP_EOS
        inputs = [pending, *proposals]  # the last proposal is fed too: a fully kept copy still gains a bonus
        draft_probs = None
        if sampler.do_sample:
            # A copy is deterministic: q is one-hot, so speculative sampling keeps token x with probability p(x).
            vocab = self.runner.adapter.lm_head.weight.shape[0]
            rows = torch.tensor(proposals, device=self.runner.cache_device)[:, None]
            draft_probs = torch.zeros(len(proposals), vocab, device=rows.device).scatter_(1, rows, 1.0)
        return Draft(proposals, inputs, self.runner.embed(inputs), 0, reason, draft_probs, SOURCE_CONTEXT)

    def record(self, draft: Draft, emitted: list[int], kept: int, seconds: float) -> None:
        self.index.extend(emitted)


class RoundRate:
    """Moving averages of one draft source's tokens emitted per round and seconds per round."""

    SMOOTHING = 0.25

    def __init__(self) -> None:
        self.tokens: float | None = None
        self.seconds: float | None = None

    def add(self, tokens: int, seconds: float) -> None:
        if self.tokens is None or self.seconds is None:
            self.tokens, self.seconds = float(tokens), seconds
            return
        self.tokens += self.SMOOTHING * (tokens - self.tokens)
        self.seconds += self.SMOOTHING * (seconds - self.seconds)

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.tokens is not None and self.seconds else None


class SourceChooser:
    """Whether this round should copy from the context: yes while context rounds have lately emitted tokens
    at least as fast as the fallback's rounds (measured). Each source is tried once before any comparison
    (short n-grams match almost everywhere, so without that the fallback might never be measured), and a
    context source that fell behind is tried again every RETRY rounds, since what the text repeats changes.
    """

    RETRY = 8

    def __init__(self) -> None:
        self.context, self.fallback = RoundRate(), RoundRate()
        self.passed_over = 0

    def prefer_context(self) -> bool:
        mine, theirs = self.context.tokens_per_second, self.fallback.tokens_per_second
        if mine is None or theirs is None:
            return mine is None
        if mine >= theirs:
            return True
        self.passed_over += 1
        if self.passed_over >= self.RETRY:
            self.passed_over = 0
            return True
        return False

    def record(self, source: str, tokens: int, seconds: float) -> None:
        (self.context if source == SOURCE_CONTEXT else self.fallback).add(tokens, seconds)


class HybridDrafter:
    """Per round, the draft expected to emit tokens fastest: the context copy when the tail recurs and copies
    have lately paid, else the fallback (the schedule's layer draft, or a plain step when it has none)."""

    def __init__(self, runner: Runner, schedule: Schedule, fallback: "LayerDrafter | PlainDrafter"):
        self.context = ContextDrafter(runner, schedule)
        self.fallback = fallback
        self.chooser = SourceChooser()

    def begin(self, prompt: list[int]) -> None:
        self.context.begin(prompt)
        self.fallback.begin(prompt)
        self.chooser = SourceChooser()

    def draft(self, pending: int, position: int, room: int, sampler: Sampler, eos: set[int]) -> Draft:
        if self.chooser.prefer_context():
            copied = self.context.draft(pending, position, room, sampler, eos)
            if copied is not None:
                return copied
        return self.fallback.draft(pending, position, room, sampler, eos)

    def record(self, draft: Draft, emitted: list[int], kept: int, seconds: float) -> None:
        self.chooser.record(draft.source, len(emitted), seconds)
        self.context.record(draft, emitted, kept, seconds)
        if draft.source != SOURCE_CONTEXT:
            self.fallback.record(draft, emitted, kept, seconds)


def drafter_for(runner: Runner, schedule: Schedule) -> "HybridDrafter | LayerDrafter | PlainDrafter":
    """The drafting policy a schedule describes."""
    fallback = LayerDrafter(runner, schedule) if schedule.max_draft > 0 else PlainDrafter(runner)
    return HybridDrafter(runner, schedule, fallback) if schedule.context_ngram > 0 else fallback
