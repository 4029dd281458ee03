"""Drafting policies, one class each behind one interface (`base`): drafting off, the layer draft (`layer`: the
model run shallower or lighter, with its cheap head `head` and low-bit weights `lowbit`), context copies
(`context`, over the n-gram index `ngram`), and the hybrid of the two (`hybrid`)."""

from ..engine.runner import Runner
from ..schedule import Schedule
from .base import (
    SOURCE_CONTEXT,
    SOURCE_LAYER,
    SOURCE_PLAIN,
    STOP_CONFIDENCE,
    STOP_CONTEXT_END,
    STOP_DEPTH,
    STOP_EOS,
    STOP_NONE,
    STOP_WIDTH,
    Draft,
    PlainDrafter,
    Width,
)
from .context import ContextDrafter
from .hybrid import HybridDrafter, RoundRate, SourceChooser
from .layer import LayerDrafter, draft_plan, prepare_drafts

__all__ = [
    "SOURCE_CONTEXT", "SOURCE_LAYER", "SOURCE_PLAIN", "STOP_CONFIDENCE", "STOP_CONTEXT_END", "STOP_DEPTH", "STOP_EOS",
    "STOP_NONE", "STOP_WIDTH", "ContextDrafter", "Draft", "HybridDrafter", "LayerDrafter", "PlainDrafter", "RoundRate",
    "SourceChooser", "Width", "draft_plan", "drafter_for", "prepare_drafts",
]  # fmt: skip


def drafter_for(runner: Runner, schedule: Schedule) -> "HybridDrafter | LayerDrafter | PlainDrafter":
    """The drafting policy a schedule describes."""
    fallback = LayerDrafter(runner, schedule) if schedule.max_draft > 0 else PlainDrafter(runner)
    return HybridDrafter(runner, schedule, fallback) if schedule.context_ngram > 0 else fallback
