"""The layer draft: the model itself run shallower or lighter (skipped or low-bit sublayers, a cheap head, an exit)."""

import torch

from ..engine.adapter import Adapter
from ..engine.fused import FusedAdapter
from ..engine.runner import Plan, Runner, compiled_pass_fits
from ..errors import UnsupportedModelError
from ..sampling import Sampler
from ..schedule import Schedule
from .base import SOURCE_LAYER, STOP_CONFIDENCE, STOP_DEPTH, STOP_EOS, STOP_WIDTH, Draft, Width
from .head import DraftHead
from .lowbit import draft_weights


def prepare_drafts(adapter: Adapter, schedule: Schedule) -> None:
    """Build the derived weights the schedule's layer draft runs (once per model), or refuse an adapter that has
    none: low-bit weights exist for the fused forward only."""
    if schedule.max_draft == 0:
        return
    schemes = schedule.lowbit_schemes
    if schemes and not isinstance(adapter, FusedAdapter):
        unfusable = adapter.family.unfusable()
        why = f"the fused forward does not compute {unfusable}" if unfusable else "backend='reference'"
        raise UnsupportedModelError(
            f"low-bit drafts run on the fused backend only; this model runs its own modules ({why})"
        )
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
