"""The hybrid policy: per round, a context copy or the fallback draft, whichever has lately emitted tokens faster."""

from ..engine.runner import Runner
from ..sampling import Sampler
from ..schedule import Schedule
from .base import SOURCE_CONTEXT, Draft, PlainDrafter
from .context import ContextDrafter
from .layer import LayerDrafter


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
