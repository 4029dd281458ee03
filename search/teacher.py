"""Teacher-forced measurements: the draft and the full model scored over the model's own greedy text.

One batched pass per sequence replaces a whole generation, which is what makes search trials cheap. The
draft here attends to its own shallow K/V at every position (in real decoding it sees exact K/V for the
accepted prefix), so these figures are a slightly pessimistic surrogate of live acceptance.
"""

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfspec.cache import PositionedCache
from selfspec.fused import engine_adapter
from selfspec.runner import Runner


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


@torch.inference_mode()
def hidden_after(
    model: PreTrainedModel,
    tokens: torch.Tensor,
    layers: int,
    skip_attn: frozenset[int] = frozenset(),
    skip_mlp: frozenset[int] = frozenset(),
    start: torch.Tensor | None = None,
    first: int = 0,
) -> torch.Tensor:
    """Hidden states [1, T, D] after layers [first, layers) over tokens [T], teacher-forced in one pass.

    `start` gives the states entering layer `first` (default: the embeddings, first=0), so a caller can walk
    the depth in segments and read several exits from one pass.
    """
    adapter = engine_adapter(model)
    runner = Runner(adapter, PositionedCache(adapter.num_layers, tokens.numel()))
    h = runner.embed(tokens.tolist()) if start is None else start
    span = runner.span(h, 0)
    return runner.layers(h, span, first, layers, skip_attn, skip_mlp)


@torch.inference_mode()
def logits_of(model: PreTrainedModel, h: torch.Tensor) -> torch.Tensor:
    return engine_adapter(model).logits(h)[0]  # [T, V]
