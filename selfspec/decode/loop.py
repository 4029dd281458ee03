"""The decode loop for one sequence: prefill, then rounds of draft -> verify -> accept.

Invariant between rounds: the cache holds exact full-model K/V for positions [0, position) and `pending`,
the last emitted token, sits at `position` and has not been fed yet.
"""

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from ..drafts import SOURCE_LAYER, Draft, HybridDrafter, LayerDrafter, PlainDrafter
from ..engine.runner import Runner
from ..sampling import Sampler
from .verify import accept_greedy, accept_sampled

# Profiler ranges around each phase of a generation (`selfspec bench --profile` reads them).
PREFILL, DRAFT, VERIFY = "selfspec.prefill", "selfspec.draft", "selfspec.verify"
# Figures that merge by adding them up.
TOTALS = ("rounds", "drafted", "accepted", "new_tokens", "seconds", "layer_draft_steps", "layer_draft_seconds",
          "layer_rejections", "prefill_seconds")  # fmt: skip
# Counters that merge by adding counts (stop reasons, accepted lengths, and the per-source tallies).
COUNTERS = ("stop_reasons", "accepted_lengths", "rounds_by_source", "drafted_by_source", "accepted_by_source")


@dataclass
class GenerationStats:
    """What one generate call did. `mean_accepted_length` counts tokens emitted per verify pass."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0
    seconds: float = 0.0  # the whole call, prompt pass included
    prefill_seconds: float = 0.0  # the prompt pass alone: the same work for every method
    layer_draft_steps: int = 0  # forwards the layer draft ran (one per token it looked at)
    layer_draft_seconds: float = 0.0  # time inside the layer draft's rounds before their verify passes
    layer_rejections: int = 0  # layer-draft rounds in which the full model rejected a proposal
    stop_reasons: Counter = field(default_factory=Counter)
    accepted_lengths: Counter = field(default_factory=Counter)
    rounds_by_source: Counter = field(default_factory=Counter)
    drafted_by_source: Counter = field(default_factory=Counter)
    accepted_by_source: Counter = field(default_factory=Counter)

    @property
    def mean_accepted_length(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_seconds_per_token(self) -> float:
        """Seconds per new token after the prompt pass: what speculation changes, and what Leviathan's bound is
        about (a long prompt's pass would otherwise dilute a short reply's figure)."""
        return (self.seconds - self.prefill_seconds) / self.new_tokens if self.new_tokens else 0.0

    @property
    def layer_draft_step_seconds(self) -> float:
        """Seconds a layer-draft forward took on average (0 without layer drafts)."""
        return self.layer_draft_seconds / self.layer_draft_steps if self.layer_draft_steps else 0.0

    @property
    def layer_alpha(self) -> float:
        """Leviathan's alpha as measured live: of the layer-drafted tokens the full model checked, the share it
        kept. Proposals after a rejection are never checked, so they do not count (kept / drafted would)."""
        accepted = self.accepted_by_source[SOURCE_LAYER]
        checked = accepted + self.layer_rejections
        return accepted / checked if checked else 0.0

    def merge(self, other: "GenerationStats") -> None:
        for name in TOTALS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in COUNTERS:
            getattr(self, name).update(getattr(other, name))

    def as_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "new_tokens": self.new_tokens,
            "seconds": round(self.seconds, 4),
            "prefill_seconds": round(self.prefill_seconds, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 3),
            "acceptance_rate": round(self.acceptance_rate, 3),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "layer_draft_steps": self.layer_draft_steps,
            "layer_draft_seconds": round(self.layer_draft_seconds, 6),
            "layer_rejections": self.layer_rejections,
            "layer_draft_step_seconds": round(self.layer_draft_step_seconds, 6),
            "layer_alpha": round(self.layer_alpha, 3),
            "stop_reasons": dict(self.stop_reasons),
            "rounds_by_source": dict(self.rounds_by_source),
            "drafted_by_source": dict(self.drafted_by_source),
            "accepted_by_source": dict(self.accepted_by_source),
        }


def decode(
    runner: Runner,
    drafter: HybridDrafter | LayerDrafter | PlainDrafter,
    prompt: list[int],
    max_new_tokens: int,
    sampler: Sampler,
    eos: set[int],
    emit: Callable[[int], bool],
) -> GenerationStats:
    """Generate up to max_new_tokens after `prompt`; `emit(token)` receives each token, returns True to stop."""
    stats = GenerationStats()
    started = time.perf_counter()
    num_layers = runner.adapter.num_layers
    plain = PlainDrafter(runner)
    if len(prompt) > 1:
        with record_function(PREFILL):
            h = runner.embed(prompt[:-1])
            runner.layers(h, runner.span(h, 0), 0, num_layers)  # prefill: fills the cache, no logits needed
        if h.is_cuda:
            torch.cuda.synchronize(h.device)  # the clock below is the prompt pass's, not its launch's
    stats.prefill_seconds = time.perf_counter() - started
    drafter.begin(prompt)
    position, pending = len(prompt) - 1, prompt[-1]
    produced = 0
    while produced < max_new_tokens:
        round_started = time.perf_counter()
        room = max_new_tokens - produced - 1
        with record_function(DRAFT):
            draft: Draft = (drafter if room > 0 else plain).draft(pending, position, room, sampler, eos)
        if draft.source == SOURCE_LAYER:
            stats.layer_draft_steps += draft.steps
            stats.layer_draft_seconds += time.perf_counter() - round_started
        with record_function(VERIFY):
            logits = runner.verify(draft.states, position, draft.verify_start)  # [len(inputs), V]
        if sampler.do_sample:
            kept, extra = accept_sampled(draft.proposals, draft.draft_probs, logits, sampler)
        else:
            kept, extra = accept_greedy(draft.proposals, logits)
        new = draft.proposals[:kept] + ([extra] if extra is not None else [])
        _count_round(stats, draft, kept, len(new))
        # The round's wall time is what a hybrid drafter weighs its sources by; the acceptance above has
        # already synchronised with the device, so reading the clock here costs nothing more.
        drafter.record(draft, new, kept, time.perf_counter() - round_started)
        position, pending = position + len(new), new[-1]
        for token in new:
            produced += 1
            if emit(token) or token in eos:
                stats.new_tokens = produced
                stats.seconds = time.perf_counter() - started
                return stats
    stats.new_tokens = produced
    stats.seconds = time.perf_counter() - started
    return stats


def _count_round(stats: GenerationStats, draft: Draft, kept: int, emitted: int) -> None:
    stats.rounds += 1
    stats.drafted += len(draft.proposals)
    stats.accepted += kept
    stats.stop_reasons[draft.stop_reason] += 1
    stats.accepted_lengths[emitted] += 1
    stats.rounds_by_source[draft.source] += 1
    stats.drafted_by_source[draft.source] += len(draft.proposals)
    stats.accepted_by_source[draft.source] += kept
    if draft.source == SOURCE_LAYER and kept < len(draft.proposals):
        stats.layer_rejections += 1
