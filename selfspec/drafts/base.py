"""What every drafting policy shares: the `Draft` a round hands the verify pass, the width bound, and drafting off.

Interface of a policy: `begin(prompt)` once per sequence, `draft(pending, position, room, sampler, eos) -> Draft`
each round (at most `room` proposals), then `record(draft, emitted, kept, seconds)` with the round's outcome.
A `Draft` carries the proposals and the hidden states the verify pass starts from, so whatever the draft
already computed exactly (its layers before the first skipped sublayer or exit) is never computed again.
"""

from dataclasses import dataclass

import torch

from ..engine.runner import Runner
from ..sampling import Sampler

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
