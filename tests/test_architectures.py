"""Every supported family, built small from a config (losslessness needs no trained weights)."""

import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import selfspec
from selfspec.adapter import PRE_NORM_FAMILIES
from selfspec.fused import FUSED_FAMILIES, FusedAdapter, engine_adapter

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, head_dim=16)  # fmt: skip
SCHEDULES = [
    selfspec.Schedule(max_draft=4),  # full depth: every draft accepted
    selfspec.Schedule(exit_layer=3, max_draft=3),
    selfspec.Schedule(skip_attn=(1, 4), skip_mlp=(2,), max_draft=5),
    selfspec.Schedule(skip_attn=(0,), exit_layers=(2, 4, 6), anneal=1.0, confidence=0.02, max_draft=4),
    selfspec.Schedule.plain(),
]


def tiny(family: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    config = CONFIG_MAPPING[family](**SMALL)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", PRE_NORM_FAMILIES)
def test_family_matches_generate(family, attn, backend):
    model = tiny(family, attn)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    expected = model.generate(ids, max_new_tokens=20, do_sample=False)
    for schedule in SCHEDULES:
        fast = selfspec.wrap(model, schedule, backend=backend)
        assert torch.equal(fast.generate(ids, max_new_tokens=20), expected), schedule


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fused_backend_is_taken_and_copies_the_weights(family):
    model = tiny(family)
    before = {name: p.clone() for name, p in model.named_parameters()}
    adapter = engine_adapter(model)
    assert isinstance(adapter, FusedAdapter) and engine_adapter(model) is adapter  # built once per model
    qkv = adapter.fused[0].qkv.weight
    assert all(qkv.data_ptr() != p.data_ptr() for p in model.parameters())
    qkv.zero_()  # the derived copy is the engine's own: the model never sees it
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_a_dropped_model_is_freed_with_everything_derived_from_it():
    model = tiny("llama")
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    low_bit = selfspec.Schedule(int4_mlp=(0, 1), head_precision="int4", head_vocab=64, max_draft=3)
    selfspec.wrap(model, low_bit).generate(ids, max_new_tokens=8)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the engine's adapter, low-bit copies and draft head do not keep it


def test_unfusable_family_or_backend_is_refused_clearly():
    with pytest.raises(selfspec.UnsupportedModelError, match="backend='reference'"):
        engine_adapter(tiny("gemma"), "fused")
    with pytest.raises(selfspec.GenerationInputError, match="backend must be one of"):
        selfspec.wrap(tiny("llama"), backend="compiled-please")


def test_prompt_filling_the_context_exactly():
    model = tiny("llama")
    limit = model.config.max_position_embeddings
    ids = torch.randint(3, 256, (1, limit - 6), generator=torch.Generator().manual_seed(2))
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    fast = selfspec.wrap(model, selfspec.Schedule(max_draft=8))
    assert torch.equal(fast.generate(ids, max_new_tokens=6), expected)
    with pytest.raises(selfspec.GenerationInputError, match="exceeds the model's context"):
        fast.generate(ids, max_new_tokens=7)


def test_unsupported_architecture_names_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(selfspec.UnsupportedModelError, match="supported: llama"):
        selfspec.wrap(model)
