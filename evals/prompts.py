"""Evaluation prompts in Spec-Bench format: one JSON object a line with question_id, category and turns.

Only the first turn is used: the engine is measured on single replies, and later turns would need the
model's own earlier answers, which differ between methods whenever a method is not lossless.
"""

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from selfspec.errors import SelfspecError

ALL = "all"  # the report's group of every prompt together, so no category may take the name


@dataclass(frozen=True)
class Prompt:
    question_id: int | str
    category: str
    text: str


def parse_record(record: Any, where: str) -> Prompt:
    """One Spec-Bench record as a Prompt; `where` names its source ("file.jsonl line 3") in errors."""
    if not isinstance(record, dict):
        raise SelfspecError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("question_id", "category", "turns") if k not in record]
    if missing:
        raise SelfspecError(f"{where}: missing field(s) {', '.join(missing)}")
    turns, category = record["turns"], record["category"]
    if not isinstance(category, str) or not category:
        raise SelfspecError(f"{where}: category must be a non-empty string")
    if category == ALL:
        raise SelfspecError(f"{where}: category {ALL!r} is reserved for the report's overall figures; rename it")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
        raise SelfspecError(f"{where}: turns must be a list whose first item is a non-empty string")
    return Prompt(record["question_id"], category, turns[0])


def load_prompts(path: str | Path) -> list[Prompt]:
    """Every prompt in a Spec-Bench JSONL file; blank lines are skipped, anything malformed is an error."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SelfspecError(f"cannot read prompts {path}: {getattr(e, 'strerror', None) or e}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SelfspecError(
                f"{path} line {number} is not JSON ({e.msg}); expected JSONL, one object a line"
            ) from None
        prompts.append(parse_record(record, f"{path} line {number}"))
    if not prompts:
        raise SelfspecError(f"{path} holds no prompts")
    return prompts


def select(
    prompts: Sequence[Prompt], categories: Iterable[str] | None = None, limit: int | None = None
) -> list[Prompt]:
    """The prompts of `categories` (all when None), at most `limit` from each category, in file order.

    The limit is per category so that a small run still covers every category it names; Spec-Bench's
    categories range from 5 to 40 prompts, and an overall limit would fill up with the first one.
    """
    if limit is not None and limit < 1:
        raise SelfspecError(f"--limit must be >= 1 (got {limit})")
    present = list(dict.fromkeys(p.category for p in prompts))
    wanted = present if categories is None else list(dict.fromkeys(categories))
    unknown = [c for c in wanted if c not in present]
    if unknown:
        raise SelfspecError(f"unknown categories {', '.join(unknown)}; the prompts have: {', '.join(present)}")
    taken: dict[str, int] = dict.fromkeys(wanted, 0)
    chosen = []
    for prompt in prompts:
        if prompt.category in taken and (limit is None or taken[prompt.category] < limit):
            taken[prompt.category] += 1
            chosen.append(prompt)
    return chosen


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Prompt token ids [1, T], inside the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return encoded["input_ids"]
    return tokenizer(text, return_tensors="pt").input_ids
