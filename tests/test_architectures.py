"""Every supported family, built small from a config (losslessness needs no trained weights)."""

import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import selfspec
from selfspec.engine.families import FAMILIES
from selfspec.engine.fused import FusedAdapter, engine_adapter

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, head_dim=16)  # fmt: skip
# Sliding windows of 8 positions, so that a 9-token prompt and 20 new tokens run well past them: every layer
# (mistral), the layers from the third up (qwen2, qwen3), five of every six (gemma 3, whose full-attention layers
# rotate by another base).
WINDOWS = {
    "mistral": dict(sliding_window=8),
    "qwen2": dict(use_sliding_window=True, max_window_layers=2, sliding_window=8),
    "qwen3": dict(use_sliding_window=True, max_window_layers=2, sliding_window=8),
    "gemma3_text": dict(sliding_window=8),
}
SCHEDULES = [
    selfspec.Schedule(max_draft=4),  # full depth: every draft accepted
    selfspec.Schedule(exit_layer=3, max_draft=3),
    selfspec.Schedule(skip_attn=(1, 4), skip_mlp=(2,), max_draft=5),
    selfspec.Schedule(skip_attn=(0,), exit_layers=(2, 4, 6), anneal=1.0, confidence=0.02, max_draft=4),
    selfspec.Schedule.plain(),
]


def tiny(family: str, attn: str = "sdpa", **overrides):
    torch.manual_seed(0)
    config = CONFIG_MAPPING[family](**(SMALL | WINDOWS.get(family, {}) | overrides))
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_generate(family, attn, backend):
    model = tiny(family, attn)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    expected = model.generate(ids, max_new_tokens=20, do_sample=False)
    for schedule in SCHEDULES:
        fast = selfspec.wrap(model, schedule, backend=backend)
        assert torch.equal(fast.generate(ids, max_new_tokens=20), expected), schedule


def test_windows_are_what_the_model_slides():
    assert [engine_adapter(tiny(f)).fused[i].window for f in ("llama", "qwen3") for i in (1, 2)] == [None] * 3 + [8]
    assert [layer.window for layer in engine_adapter(tiny("gemma3_text")).fused] == [8] * 5 + [None]
    assert {layer.window for layer in engine_adapter(tiny("mistral")).fused} == {8}


@pytest.mark.parametrize("family", FAMILIES)
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
    for family, setting in (("llama", dict(hidden_act="gelu")), ("llama", dict(mlp_bias=True)),
                            ("gemma3_text", dict(attn_logit_softcapping=50.0))):  # fmt: skip
        model = tiny(family, **setting)
        assert not isinstance(engine_adapter(model), FusedAdapter)  # auto: the model's own modules
        with pytest.raises(selfspec.UnsupportedModelError, match="does not compute .*backend='reference'"):
            engine_adapter(model, "fused")
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
