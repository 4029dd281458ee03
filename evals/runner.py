"""Runs every decoding method in one process, on the same prompts, with the same settings.

Methods are interleaved: all of them run on a prompt before the next prompt starts, and their order
rotates from prompt to prompt, so slow drift of the machine (heat, other load) falls on every method
alike instead of on whichever happened to run last.
"""

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import selfspec
from selfspec import GenerationStats, Schedule, SelfspecError, SpeculativeModel

from .prompts import Prompt, encode

REFERENCE = "generate"  # the method every other one is checked and timed against
BASELINES = ("generate", "plain", "prompt_lookup")
PROMPT_LOOKUP_TOKENS = 10


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int = 256
    repeats: int = 1
    do_sample: bool = False
    seed: int = 0


@dataclass
class Method:
    name: str
    generate: Callable[..., torch.Tensor]  # model.generate-like: input_ids [1, T] -> [1, T + new]
    engine: SpeculativeModel | None = None  # set for the selfspec engine, which also reports GenerationStats


@dataclass
class MethodRun:
    tokens: list[int]  # new tokens of the first repeat (greedy, or sampling from one seed, repeats them)
    rates: list[float]  # new tokens per second, one per repeat
    stats: dict[str, Any] | None  # engine statistics of the first repeat

    @property
    def tokens_per_second(self) -> float:
        return statistics.median(self.rates)


@dataclass
class PromptRun:
    prompt: Prompt
    prompt_tokens: int
    runs: dict[str, MethodRun]


def check_baselines(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise SelfspecError(f"unknown baselines {', '.join(unknown)}; choose from {', '.join(BASELINES)}")


def build_methods(
    model: PreTrainedModel, schedule: Schedule | None, baselines: Sequence[str], source: str | None = None
) -> list[Method]:
    """The reference `generate` (always: speed-ups and losslessness are measured against it), the other
    requested baselines, and `selfspec` with `schedule` (None: what tune recorded here, else the built-in default)."""

    check_baselines(baselines)

    def lookup(input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return model.generate(input_ids, prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS, **kwargs)

    plain = selfspec.wrap(model, Schedule.plain())
    fast = selfspec.wrap(model, schedule, source=source)
    available = {
        "generate": Method("generate", model.generate),
        "plain": Method("plain", plain.generate, plain),
        "prompt_lookup": Method("prompt_lookup", lookup),
    }
    names = [REFERENCE] + [b for b in BASELINES if b in baselines and b != REFERENCE]
    return [available[name] for name in names] + [Method("selfspec", fast.generate, fast)]


def run_method(method: Method, input_ids: torch.Tensor, settings: Settings) -> MethodRun:
    """`settings.repeats` timed generations of one prompt; only new tokens count towards tokens/s."""
    tokens: list[int] | None = None
    rates, stats = [], None
    for _ in range(settings.repeats):
        if settings.do_sample:
            # every method and repeat draws from the same seed, whatever the prompt's place in the run
            torch.manual_seed(settings.seed)
        with torch.inference_mode():
            started = time.perf_counter()
            output = method.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=settings.max_new_tokens,
                do_sample=settings.do_sample,
            )
            seconds = time.perf_counter() - started
        new = output[0, input_ids.shape[1] :].tolist()
        if tokens is None:
            tokens, stats = new, _stats(method)
        rates.append(len(new) / seconds)
    return MethodRun(tokens, rates, stats)


def _stats(method: Method) -> dict[str, Any] | None:
    if method.engine is None:
        return None
    stats: GenerationStats = method.engine.last_stats
    # JSON object keys are strings; as_dict leaves the histogram out
    lengths = {str(length): count for length, count in sorted(stats.accepted_lengths.items())}
    return {**stats.as_dict(), "accepted_lengths": lengths}


def run_eval(
    methods: Sequence[Method],
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    settings: Settings,
    device: torch.device | str = "cpu",
    on_step: Callable[[Prompt, str], None] | None = None,
) -> Iterator[PromptRun]:
    """Yield one PromptRun per prompt, after one untimed warm-up generation per method.

    `on_step(prompt, method_name)` is called after each method finishes a prompt (for progress bars).
    """
    if not prompts:
        return
    warm_ids = encode(tokenizer, prompts[0].text).to(device)
    for method in methods:
        run_method(method, warm_ids, replace(settings, repeats=1))
    for index, prompt in enumerate(prompts):
        input_ids = encode(tokenizer, prompt.text).to(device)
        shift = index % len(methods)
        runs = {}
        for method in [*methods[shift:], *methods[:shift]]:
            runs[method.name] = run_method(method, input_ids, settings)
            if on_step is not None:
                on_step(prompt, method.name)
        yield PromptRun(prompt, input_ids.shape[1], {m.name: runs[m.name] for m in methods})
