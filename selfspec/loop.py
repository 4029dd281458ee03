"""The decode loop for one sequence: prefill, then rounds of draft -> verify -> accept.

Invariant between rounds: the cache holds exact full-model K/V for positions [0, position) and `pending`,
the last emitted token, sits at `position` and has not been fed yet.
"""

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from .drafting import Draft, PlainDrafter
from .runner import Runner
from .sampling import Sampler
from .verify import accept_greedy, accept_sampled


@dataclass
class GenerationStats:
    """What one generate call did. `mean_accepted_length` counts tokens emitted per verify pass."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    stop_reasons: Counter = field(default_factory=Counter)
    accepted_lengths: Counter = field(default_factory=Counter)

    @property
    def mean_accepted_length(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def merge(self, other: "GenerationStats") -> None:
        for name in ("rounds", "drafted", "accepted", "new_tokens", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.stop_reasons.update(other.stop_reasons)
        self.accepted_lengths.update(other.accepted_lengths)

    def as_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "new_tokens": self.new_tokens,
            "seconds": round(self.seconds, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 3),
            "acceptance_rate": round(self.acceptance_rate, 3),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "stop_reasons": dict(self.stop_reasons),
        }


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


def decode(
    runner: Runner,
    drafter,
    prompt: list[int],
    max_new_tokens: int,
    sampler: Sampler,
    eos: set[int],
    emit: Callable[[int], bool],
    width: Width,
) -> GenerationStats:
    """Generate up to max_new_tokens after `prompt`; `emit(token)` receives each token, returns True to stop."""
    stats = GenerationStats()
    started = time.perf_counter()
    num_layers = runner.adapter.num_layers
    plain = PlainDrafter(runner)
    if len(prompt) > 1:
        h = runner.embed(prompt[:-1])
        runner.layers(h, runner.span(h, 0), 0, num_layers)  # prefill: fills the cache, no logits needed
    position, pending = len(prompt) - 1, prompt[-1]
    produced = 0
    while produced < max_new_tokens:
        room = min(width.current, max_new_tokens - produced - 1)
        source = drafter if room > 0 else plain
        draft: Draft = source.draft(pending, position, room, sampler, eos)
        span = runner.span(draft.states, position)
        h = runner.layers(draft.states, span, draft.verify_start, num_layers)
        logits = runner.logits(h)[0]  # [len(inputs), V]
        if sampler.do_sample:
            kept, extra = accept_sampled(draft.proposals, draft.draft_probs, logits, sampler)
        else:
            kept, extra = accept_greedy(draft.proposals, logits)
        new = draft.proposals[:kept] + ([extra] if extra is not None else [])
        _count_round(stats, draft, kept, len(new))
        width.update(len(draft.proposals), kept)
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
