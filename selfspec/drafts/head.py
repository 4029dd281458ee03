"""The LM head a layer draft scores with: the model's own, a low-bit copy of it, or either over only the tokens
the draft is likely to need, so a draft token does not pay for reading the whole vocabulary.

The verify pass always scores with the model's full, exact head: whatever the draft head misses costs
acceptance, never correctness.
"""

import torch
import torch.nn.functional as F

from ..engine.adapter import Adapter
from ..engine.fused import FusedLinear
from ..sampling import greedy_index
from ..schedule import Schedule
from .lowbit import draft_weights


def subset_rows(ranked: tuple[int, ...], size: int, vocab_size: int) -> torch.Tensor:
    """The `size` token ids a subset head scores: `ranked` first, then the lowest ids (byte-level BPE numbers its
    merges in the order it learnt them, most frequent first), sorted: [size]."""
    chosen = dict.fromkeys(t for t in ranked if t < vocab_size)
    for token in range(vocab_size):
        if len(chosen) >= size:
            break
        chosen.setdefault(token)
    return torch.tensor(sorted(list(chosen)[:size]), dtype=torch.long)


class DraftHead:
    """Draft logits [1, T, V]; where the head scores a subset, every other token is -inf (never drafted)."""

    def __init__(self, adapter: Adapter, schedule: Schedule):
        self.adapter = adapter
        self.weight = adapter.lm_head.weight  # [V, D], the model's own: read, never written
        self.vocab_size = self.weight.shape[0]
        subset = 0 < schedule.head_vocab < self.vocab_size
        rows = subset_rows(schedule.head_tokens, schedule.head_vocab, self.vocab_size) if subset else None
        self.rows = None if rows is None else rows.to(self.weight.device)
        self.linear = self._linear(schedule.head_precision)
        self.extra_rows: torch.Tensor | None = None  # the prompt's tokens outside the subset, scored exactly
        self.extra_weight: torch.Tensor | None = None
        self.ids = self.rows  # the ids of what `scores` scores: the subset, then the prompt's tokens outside it

    def _linear(self, precision: str):
        dtype, device = self.weight.dtype, self.weight.device
        if precision != "exact":
            return draft_weights(self.adapter, precision).head_linear(self.rows, dtype, device)
        if self.rows is None:
            return None  # the model's own head
        return FusedLinear(self.weight.detach()[self.rows], None, [len(self.rows)])

    def begin(self, prompt: list[int]) -> None:
        """Score the prompt's own tokens too: a reply often repeats the words it was asked about."""
        if self.rows is None:
            return
        extra = sorted(set(prompt) - set(self.rows.tolist()))
        self.extra_rows = torch.tensor(extra, dtype=torch.long, device=self.weight.device) if extra else None
        self.extra_weight = self.weight.detach()[self.extra_rows] if extra else None
        self.ids = self.rows if self.extra_rows is None else torch.cat([self.rows, self.extra_rows])

    def scores(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores [1, T, S] of the tokens the head scores, and their ids [S] (None: every token, in id order)."""
        if self.linear is None:
            return self.adapter.logits(h), None
        x = self.adapter.final_norm(h)
        scores = self.linear(x)  # [1, T, V or subset]
        if self.rows is None:
            return scores, None
        if self.extra_rows is not None:
            scores = torch.cat([scores, F.linear(x, self.extra_weight)], dim=-1)
        return scores, self.ids

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        scores, ids = self.scores(h)
        if ids is None:
            return scores
        logits = scores.new_full((*scores.shape[:-1], self.vocab_size), float("-inf"))
        logits[..., ids] = scores
        return logits

    def top(self, h: torch.Tensor) -> tuple[int, torch.Tensor, int]:
        """The greedy draft token after h [1, T, D], the last position's scores [S] and the token's place in them.

        Over the scored tokens alone: a subset head's full row is -inf almost everywhere, and filling, scanning and
        softmaxing 151,936 entries cost more than the subset's own product (qwen2.5-coder-0.5b, 32,768 rows)."""
        scores, ids = self.scores(h)
        scores = scores[0, -1]
        place = int(greedy_index(scores))
        return (place if ids is None else int(ids[place])), scores, place
