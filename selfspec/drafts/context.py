"""Context copies: what followed the latest earlier occurrence of the text's tail, proposed without running a layer."""

import torch

from ..engine.runner import Runner
from ..sampling import Sampler
from ..schedule import Schedule
from .base import SOURCE_CONTEXT, STOP_CONTEXT_END, STOP_EOS, STOP_WIDTH, Draft
from .ngram import NgramIndex


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
