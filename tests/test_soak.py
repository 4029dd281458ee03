"""Soak: many generations in a row with random schedules and lengths, every output checked against
model.generate in float32, and memory that must not grow. Long: not in the default run (`make soak`)."""

import random
import re
from pathlib import Path

import pytest
import torch
from selfspec.evals.longform import longform_prompts
from selfspec.search.teacher import encode_prompt

import selfspec

ROUNDS = 60
WARMUP = 10  # generations before the memory baseline: allocator pools and caches settle first
MAX_GROWTH_MB = 64


def resident_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def random_schedule(rng: random.Random, num_layers: int) -> selfspec.Schedule:
    layers = range(num_layers)
    return selfspec.Schedule(
        skip_attn=tuple(rng.sample(layers, rng.randint(0, 4))),
        skip_mlp=tuple(rng.sample(layers, rng.randint(0, 2))),
        exit_layer=rng.choice([None, rng.randint(num_layers // 2, num_layers)]),
        max_draft=rng.randint(0, 6),
        anneal=rng.choice([0.0, 1.0]),
        confidence=rng.choice([0.0, 0.5, 0.8]),
        adaptive_width=rng.random() < 0.5,
        context_ngram=rng.choice([0, 0, 2, 3]),
        context_max_draft=rng.randint(1, 12),
    )


@pytest.mark.soak
def test_soak_many_generations_match_and_memory_stays_flat(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    rng = random.Random(0)
    prompts = [encode_prompt(tokenizer, p.text) for p in longform_prompts()]
    baseline = None
    for i in range(ROUNDS):
        if i == WARMUP:
            baseline = resident_mb()
        ids, new_tokens = rng.choice(prompts), rng.randint(1, 96)
        schedule = random_schedule(rng, model.config.num_hidden_layers)
        expected = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        out = selfspec.wrap(model, schedule).generate(ids, max_new_tokens=new_tokens, do_sample=False)
        assert torch.equal(out, expected), (i, schedule)
    growth = resident_mb() - baseline
    print(f"resident memory grew {growth:.1f} MB over {ROUNDS - WARMUP} generations")
    assert growth < MAX_GROWTH_MB
