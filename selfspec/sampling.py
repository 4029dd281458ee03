"""Token choice: greedy, or sampling warped exactly as `model.generate` warps (temperature, top-k, top-p).

The warpers are transformers' own, applied in generate's order, so the target distribution p that
speculative sampling preserves is the one `model.generate(do_sample=True)` samples from.
"""

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .errors import GenerationInputError


def greedy_index(scores: torch.Tensor) -> torch.Tensor:
    """argmax over the last dimension, the first index of a tie as argmax gives. `max` is the same reduction, but
    on CPU it runs 4-5x faster than `argmax` (a 151,936-token bfloat16 row: 135 vs 511 us)."""
    return scores.max(dim=-1).indices


@dataclass
class Sampler:
    do_sample: bool
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self.warpers = LogitsProcessorList()
        if not self.do_sample:
            return
        if self.temperature is not None and self.temperature <= 0:
            raise GenerationInputError(
                f"do_sample=True needs temperature > 0 (got {self.temperature}); use do_sample=False for greedy"
            )
        if self.temperature is not None and self.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k is not None and self.top_k != 0:
            self.warpers.append(TopKLogitsWarper(top_k=self.top_k, min_tokens_to_keep=1))
        if self.top_p is not None and self.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=self.top_p, min_tokens_to_keep=1))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped distribution for each row of logits [T, V] -> [T, V] (float32)."""
        scores = self.warpers(None, logits.float())
        return torch.softmax(scores, dim=-1)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)  # [T, V] -> [T]
