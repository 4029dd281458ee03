"""Calibration prompts: a built-in varied set, or a Spec-Bench JSONL file read as the evals read it."""

from pathlib import Path

from selfspec.evals.prompts import Prompt, load_prompts

from selfspec.errors import SelfspecError

PASSAGE = (
    "The Great Barrier Reef, off the coast of Queensland, is the world's largest coral reef system, made of "
    "nearly three thousand individual reefs spread over more than 340,000 square kilometres. It supports a huge "
    "diversity of life, including many species of fish, molluscs, turtles and sharks. Since the 1990s, rising "
    "sea temperatures have caused repeated mass bleaching events, in which stressed corals expel the algae "
    "that feed them and turn white. Reefs can recover if waters cool, but recovery takes years, and bleaching "
    "events have become more frequent."
)


BUILTIN: tuple[Prompt, ...] = tuple(
    Prompt(f"builtin-{i:02d}", category, text)
    for i, (category, text) in enumerate(
        [
            ("chat", "Hi! I just moved to a new city and don't know anyone. How can I make friends?"),
            ("explanation", "Explain how vaccines train the immune system, in simple terms."),
            ("code", "Write a Python function that returns the n-th Fibonacci number using iteration."),
            ("summary", f"Summarize the following passage in two sentences.\n\n{PASSAGE}"),
            ("list", "List ten ideas for a rainy weekend at home."),
            ("translation", "Translate into French: 'The library opens at nine and closes at six on weekdays.'"),
            ("math", "A train travels 180 km in 2 hours and 30 minutes. What is its average speed? Show your steps."),
            ("writing", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
            ("code", "Explain what this code does and fix its bug:\n\ndef mean(xs):\n    return sum(xs) / len(xs) + 1"),
            ("advice", "What are some good habits for getting better sleep?"),
            ("qa", f"Read the passage and answer: why do corals turn white?\n\n{PASSAGE}"),
            ("explanation", "What is the difference between weather and climate?"),
            ("email", "Write a polite email to my landlord asking to fix a leaking kitchen tap."),
            ("code", "Write a SQL query that finds the five customers with the highest total order value."),
            (
                "reasoning",
                "If all roses are flowers and some flowers fade quickly, can we conclude some roses fade quickly?",
            ),
            ("list", "Give me a packing list for a three-day hiking trip."),
        ]
    )
)


def read_prompts(path: str | Path) -> list[Prompt]:
    """Spec-Bench JSONL (the first turn of each question), at least two, since some are held out."""
    prompts = load_prompts(path)
    if len(prompts) < 2:
        raise SelfspecError(f"{path} holds {len(prompts)} prompt; tuning needs at least 2 (some are held out)")
    return prompts


def split(prompts: list[Prompt] | tuple[Prompt, ...], held_out: float = 0.35) -> tuple[list[Prompt], list[Prompt]]:
    """(calibration, held out): every k-th prompt is held out, so both halves cover the categories."""
    count = max(1, round(len(prompts) * held_out))
    every = len(prompts) / count
    chosen = {int(i * every + every / 2) for i in range(count)}
    calibration = [p for i, p in enumerate(prompts) if i not in chosen]
    return calibration, [p for i, p in enumerate(prompts) if i in chosen]
