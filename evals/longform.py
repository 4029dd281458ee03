"""The built-in prompt set: long-form requests, where replies run to hundreds of tokens.

Speculative decoding pays off over long replies, and Spec-Bench's prompts often want short ones.
Kept as Python rather than a .jsonl file so it ships inside the package with no package-data setup;
the records are Spec-Bench-shaped and go through the same validation as a prompt file.
"""

from .prompts import Prompt, parse_record

RECORDS = [
    {"question_id": "essay-1", "category": "essay", "turns": [
        "Write a five-paragraph essay arguing that public libraries matter more in the internet age than "
        "before it. Give an introduction, three arguments with concrete examples, and a conclusion."]},
    {"question_id": "essay-2", "category": "essay", "turns": [
        "Write an essay on the trade-offs of remote work for a small software company: productivity, "
        "hiring, team cohesion and cost. End with a recommendation."]},
    {"question_id": "essay-3", "category": "essay", "turns": [
        "Write a reflective essay about what learning to cook teaches a person beyond making food."]},
    {"question_id": "story-1", "category": "story", "turns": [
        "Write a short story about a lighthouse keeper who finds a message in a bottle addressed to "
        "her, dated fifty years in the future."]},
    {"question_id": "story-2", "category": "story", "turns": [
        "Write a children's story about a small robot who is afraid of the dark and the friends who "
        "help it. Use simple sentences and a gentle ending."]},
    {"question_id": "story-3", "category": "story", "turns": [
        "Tell a mystery story set on an overnight train, in which a violin goes missing between two "
        "stations. Reveal the culprit at the end."]},
    {"question_id": "explain-1", "category": "explain", "turns": [
        "Explain how vaccines train the immune system, step by step, for a reader with no biology "
        "background. Use an analogy and finish with a short summary."]},
    {"question_id": "explain-2", "category": "explain", "turns": [
        "Explain how a refrigerator keeps food cold, covering the compressor, the refrigerant and why "
        "the back of the fridge feels warm."]},
    {"question_id": "explain-3", "category": "explain", "turns": [
        "Explain compound interest with a worked example over ten years, and describe how the result "
        "changes if the interest is compounded monthly instead of yearly."]},
    {"question_id": "code-1", "category": "code", "turns": [
        "Write a Python function that checks whether a string is a palindrome, ignoring case and "
        "punctuation. Explain each step of the code and add a few example calls."]},
    {"question_id": "code-2", "category": "code", "turns": [
        "Implement binary search in Python, iteratively and recursively. Comment the code and explain "
        "the time complexity of each version."]},
    {"question_id": "code-3", "category": "code", "turns": [
        "Write a Python class for a simple to-do list with methods to add, complete and list tasks. "
        "Explain the design and show how to use it."]},
]  # fmt: skip


def longform_prompts() -> list[Prompt]:
    return [parse_record(record, f"built-in prompt {i}") for i, record in enumerate(RECORDS, 1)]
