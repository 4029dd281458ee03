"""Greedy output of every drafting mode equals model.generate token for token, in float32, on the real models."""

import hashlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import selfspec
from selfspec.drafting import STOP_EOS

PROMPTS = {
    "chat": "Write a haiku about the sea.",
    "explain": "Explain how a bicycle works.",
    "code": "Write a Python function that checks whether a number is prime.",
}
NEW_TOKENS = 24


def encode(tokenizer, text: str) -> torch.Tensor:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


_references: dict = {}


def reference(model, tokenizer, kind: str, new_tokens: int = NEW_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    key = (id(model), kind, new_tokens)
    if key not in _references:
        ids = encode(tokenizer, PROMPTS[kind])
        _references[key] = ids, model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return _references[key]


def schedules(num_layers: int):
    layer = st.integers(0, num_layers - 1)
    return st.builds(
        selfspec.Schedule,
        skip_attn=st.lists(layer, max_size=6).map(tuple),
        skip_mlp=st.lists(layer, max_size=4).map(tuple),
        exit_layer=st.one_of(st.none(), st.integers(1, num_layers)),
        exit_layers=st.lists(st.integers(1, num_layers), max_size=3).map(tuple),
        max_draft=st.integers(0, 8),
        anneal=st.sampled_from([0.0, 0.5, 2.0]),
        confidence=st.sampled_from([0.0, 0.2, 0.5, 0.8]),
        max_depth=st.one_of(st.none(), st.just(num_layers)),
        adaptive_width=st.booleans(),
        context_ngram=st.sampled_from([0, 0, 1, 2, 4]),  # context copies beside the layer draft, or instead
        context_min_ngram=st.just(1),
        context_max_draft=st.integers(1, 12),
    )


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=schedules(30), kind=st.sampled_from(sorted(PROMPTS)))
def test_random_schedules_match_generate_smollm2(smollm2_fp32, schedule, kind):
    model, tokenizer = smollm2_fp32
    ids, expected = reference(model, tokenizer, kind)
    fast = selfspec.wrap(model, schedule)
    assert torch.equal(fast.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), expected), schedule


@pytest.mark.parametrize(
    "schedule",
    [
        selfspec.Schedule(exit_layer=20, max_draft=4),
        selfspec.Schedule(skip_attn=(5, 9, 13), skip_mlp=(11,), max_draft=3, confidence=0.4),
        selfspec.Schedule(exit_layers=(16, 20, 22), max_draft=6, anneal=1.0, confidence=0.5),
        selfspec.Schedule.plain(),
    ],
    ids=["exit", "skip", "dynamic-exit", "plain"],
)
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_modes_match_generate_qwen05(qwen05_fp32, schedule, backend):
    model, tokenizer = qwen05_fp32
    ids, expected = reference(model, tokenizer, "code", new_tokens=16)
    fast = selfspec.wrap(model, schedule, backend=backend)
    assert torch.equal(fast.generate(ids, max_new_tokens=16, do_sample=False), expected)


def test_drafts_are_accepted_and_counted(smollm2_fp32):
    """A full-depth draft is the model itself: every drafted token must be accepted."""
    model, tokenizer = smollm2_fp32
    ids, expected = reference(model, tokenizer, "explain")
    fast = selfspec.wrap(model, selfspec.Schedule(max_draft=5))
    assert torch.equal(fast.generate(ids, max_new_tokens=NEW_TOKENS), expected)
    stats = fast.last_stats
    assert stats.drafted > 0 and stats.accepted == stats.drafted
    assert stats.new_tokens == NEW_TOKENS and stats.mean_accepted_length > 4


def test_eos_inside_a_drafted_block(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    ids = encode(tokenizer, PROMPTS["chat"])
    expected = model.generate(ids, max_new_tokens=200, do_sample=False)
    assert expected[0, -1] == model.generation_config.eos_token_id, "the reference must end on EOS"
    fast = selfspec.wrap(model, selfspec.Schedule(max_draft=8))
    out = fast.generate(ids, max_new_tokens=200)
    assert torch.equal(out, expected)
    assert fast.last_stats.stop_reasons[STOP_EOS] == 1


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5])
def test_draft_never_runs_past_max_new_tokens(smollm2_fp32, max_new_tokens):
    model, tokenizer = smollm2_fp32
    ids = encode(tokenizer, PROMPTS["explain"])
    expected = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    fast = selfspec.wrap(model, selfspec.Schedule(max_draft=8))
    assert torch.equal(fast.generate(ids, max_new_tokens=max_new_tokens), expected)
    assert fast.last_stats.new_tokens == max_new_tokens


def test_left_padded_batch_matches_generate(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
             for t in (PROMPTS["chat"], "Hi!")]  # fmt: skip
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    expected = model.generate(**batch, max_new_tokens=12, do_sample=False)
    fast = selfspec.wrap(model, selfspec.Schedule(skip_attn=(10, 14), max_draft=3))
    assert torch.equal(fast.generate(**batch, max_new_tokens=12), expected)


def test_parameters_unchanged_by_wrap_and_generate(smollm2_fp32):
    model, tokenizer = smollm2_fp32

    def digest() -> str:
        h = hashlib.sha256()
        for name, p in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    before = digest()
    fast = selfspec.wrap(model, selfspec.Schedule(skip_mlp=(3,), exit_layers=(18, 24), confidence=0.5))
    fast.generate(encode(tokenizer, PROMPTS["code"]), max_new_tokens=8)
    assert digest() == before
    assert selfspec.unwrap(fast) is model
