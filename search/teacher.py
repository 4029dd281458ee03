"""Teacher-forced measurements: the draft and the full model scored over the model's own greedy text.

One batched pass per sequence replaces a whole generation, which is what makes search trials cheap; the
surrogate (`surrogate.Text`) scores drafts over these texts.
"""

from collections import Counter
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Continuation:
    tokens: torch.Tensor  # [T] prompt followed by the model's greedy continuation
    prompt_length: int


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """[1, T] prompt ids, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return ids


@torch.inference_mode()
def greedy_continuations(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], new_tokens: int
) -> list[Continuation]:
    out = []
    for text in prompts:
        ids = encode_prompt(tokenizer, text)
        full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
        out.append(Continuation(full[0], ids.shape[1]))
    return out


def frequent_tokens(continuations: list[Continuation], count: int = 512) -> tuple[int, ...]:
    """The tokens the model itself wrote most often, most frequent first (ties: lower id first)."""
    counts = Counter(t for c in continuations for t in c.tokens[c.prompt_length :].tolist())
    return tuple(sorted(counts, key=lambda t: (-counts[t], t))[:count])


def held_out_rankings(continuations: list[Continuation], count: int = 512) -> list[tuple[int, ...]]:
    """Per continuation, `frequent_tokens` of the other half of them: a cheap head ranked on the very text it is
    scored on never misses a token there (every token of the text is "frequent"), which is not how decoding
    meets new text. Two halves, not one text left out each: each ranking is another head to pack."""
    half = (len(continuations) + 1) // 2
    first, second = continuations[:half], continuations[half:]
    return [frequent_tokens(second, count)] * half + [frequent_tokens(first, count)] * len(second)
