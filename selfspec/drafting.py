"""Drafting policies, one class each behind one interface: given the pending token, propose what follows.

A `Draft` carries the proposals and the hidden states the verify pass starts from, so whatever the draft
already computed exactly (its layers before the first skipped sublayer or exit) is never computed again.
"""

from dataclasses import dataclass

import torch

from .runner import Runner
from .sampling import Sampler
from .schedule import Schedule

# Why a round stopped drafting.
STOP_WIDTH, STOP_CONFIDENCE, STOP_DEPTH, STOP_EOS, STOP_NONE = "width", "confidence", "depth", "eos", "no_draft"


@dataclass
class Draft:
    proposals: list[int]  # drafted tokens, in order
    inputs: list[int]  # tokens the verify pass feeds: the pending token, then proposals (maybe all but the last)
    states: torch.Tensor  # [1, len(inputs), D]: hidden states of `inputs` entering layer `verify_start`
    verify_start: int
    stop_reason: str
    draft_probs: torch.Tensor | None = None  # [len(proposals), V] when sampling


class PlainDrafter:
    """Drafting off: every round feeds the pending token through the whole model."""

    def __init__(self, runner: Runner):
        self.runner = runner

    def draft(self, pending: int, position: int, width: int, sampler: Sampler, eos: set[int]) -> Draft:
        return Draft([], [pending], self.runner.embed([pending]), 0, STOP_NONE)


class LayerDrafter:
    """The model itself, run shallower: skipped sublayers and/or an exit, fixed or per token (dynamic exit).

    Confidence is the probability of the drafted token under softmax(logits / T_l), T_l = 1 + a (1 - l / L),
    l the draft's effective depth: shallow drafts are overconfident, so they must be surer to go on.
    """

    def __init__(self, runner: Runner, schedule: Schedule):
        self.runner = runner
        self.schedule = schedule
        num_layers = runner.adapter.num_layers
        self.num_layers = num_layers
        self.skip_attn = frozenset(schedule.skip_attn)
        self.skip_mlp = frozenset(schedule.skip_mlp)
        all_exits = schedule.exits(num_layers)
        depth_cap = schedule.max_depth or num_layers
        self.exits = tuple(e for e in all_exits if e <= depth_cap)
        self.deeper_exits_cut = len(self.exits) < len(all_exits)
        first_skip = min(self.skip_attn | self.skip_mlp, default=num_layers)
        # Up to this depth the draft computes exactly what the full model does, so its states are reusable.
        self.exact_depth = min(first_skip, self.exits[-1])
        self.checkpoints = sorted({e for e in self.exits if e < self.exact_depth} | {self.exact_depth})
        self.temperatures = {e: self._temperature(e) for e in self.exits}

    def _temperature(self, exit_layer: int) -> float:
        skipped_sublayers = sum(i < exit_layer for i in self.skip_attn) + sum(i < exit_layer for i in self.skip_mlp)
        effective_depth = exit_layer - skipped_sublayers / 2
        return 1.0 + self.schedule.anneal * (1.0 - effective_depth / self.num_layers)

    def draft(self, pending: int, position: int, width: int, sampler: Sampler, eos: set[int]) -> Draft:
        inputs, proposals, saved, reached, probs = [pending], [], [], [], []
        reason = STOP_WIDTH
        while len(proposals) < width:
            token, confident, prob, depth_states, depth = self._step(inputs[-1], position + len(inputs) - 1, sampler)
            saved.append(depth_states)
            reached.append(depth)
            if not confident:
                reason = STOP_DEPTH if self.deeper_exits_cut else STOP_CONFIDENCE
                break
            proposals.append(token)
            probs.append(prob)
            if token in eos:
                reason = STOP_EOS
                break
            inputs.append(token)
        verify_start = min(reached)
        states = [s[verify_start] for s in saved]  # each [1, 1, D]
        if len(states) < len(inputs):
            # The last proposal was never fed: bring it to verify_start (only the layers below it) so the
            # verify pass also scores what follows it, and a fully accepted round still gains a bonus token.
            h = self.runner.embed([inputs[-1]])
            span = self.runner.span(h, position + len(inputs) - 1)
            states.append(self.runner.layers(h, span, 0, verify_start))
        draft_probs = torch.stack(probs) if sampler.do_sample and probs else None
        return Draft(proposals, inputs, torch.cat(states, dim=1), verify_start, reason, draft_probs)

    def _step(self, token: int, position: int, sampler: Sampler):
        """One draft token: run to the first exit where it is confident (or the last allowed exit)."""
        h = self.runner.embed([token])
        span = self.runner.span(h, position)
        depth_states = {0: h}
        layer = 0
        for boundary in sorted(set(self.checkpoints) | set(self.exits)):
            h = self.runner.layers(h, span, layer, boundary, self.skip_attn, self.skip_mlp)
            layer = boundary
            if boundary in self.checkpoints:
                depth_states[boundary] = h
            if boundary not in self.exits:
                continue
            logits = self.runner.logits(h)[0, -1]  # [V]
            if sampler.do_sample:
                q = sampler.probs(logits[None])[0]
                choice = int(sampler.sample(q[None])[0])
            else:
                q, choice = None, int(logits.argmax())
            annealed = torch.softmax(logits.float() / self.temperatures[boundary], dim=-1)[choice]
            confident = float(annealed) >= self.schedule.confidence
            if confident or boundary == self.exits[-1]:
                depth = min(boundary, self.exact_depth)
                return choice, confident, q, depth_states, depth
        raise AssertionError("unreachable: the last exit always returns")
