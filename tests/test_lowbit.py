"""Low-bit draft weights and the cheap draft head, on the real smollm2-135m: the kernels compute what the codes
stand for, the model's own parameters never change, the disk cache is used, and drafts through them stay
lossless (greedy token for token, sampling by chi-square)."""

import pytest
import torch
import torch.nn.functional as F
from selfspec.evals.floor import draft_weight_bytes, step_weight_bytes
from test_architectures import tiny
from test_sampling import SAMPLES, TEMPERATURE, TOP_K, exact_pair_distribution, p_value

import selfspec
from selfspec import Schedule, ScheduleError, UnsupportedModelError
from selfspec.drafts.head import DraftHead, subset_rows
from selfspec.drafts.lowbit import GROUP_SIZE, KERNELS, _build, cache_path, draft_weights, quantize
from selfspec.engine.fused import engine_adapter
from selfspec.sampling import greedy_index

EVERY = tuple(range(30))


@pytest.fixture(scope="module")
def smollm2_bf16():
    return selfspec.load_model("smollm2-135m", "bfloat16")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_values_stay_close_to_the_weights(smollm2_fp32, scheme):
    model, _ = smollm2_fp32
    weight = model.model.layers[3].mlp.down_proj.weight  # [576, 1536]
    q = quantize(weight, scheme)
    error = (q.dequantize() - weight).abs()
    # int8: half a step of absmax / 127 per row; int4: half a step of (max - min) / 15 per group
    step = weight.abs().amax(1, keepdim=True) / 127 if scheme == "int8" else None
    if step is None:
        groups = weight.detach().view(weight.shape[0], -1, GROUP_SIZE)
        step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(GROUP_SIZE, dim=1)
    assert bool((error <= step / 2 + 1e-6).all())
    assert q.values.numel() == weight.numel() // (2 if scheme == "int4" else 1)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_computes_what_the_codes_stand_for(smollm2_fp32, scheme, dtype):
    model, _ = smollm2_fp32
    q = quantize(model.model.layers[0].mlp.gate_proj.weight, scheme)
    x = torch.randn(1, q.shape[1], dtype=dtype)
    for name, build in KERNELS[scheme].items():
        assert_computes_the_codes(build(q, dtype, torch.device("cpu")), q, x, name)


def test_the_w4a8_kernel_pads_rows_to_whole_blocks_and_takes_several_inputs(smollm2_fp32):
    model, _ = smollm2_fp32
    q = quantize(model.model.layers[0].mlp.down_proj.weight, "int4").rows(torch.arange(100))  # 6 blocks and 4 rows
    run = KERNELS["int4"]["w4a8"](q, torch.float32, torch.device("cpu"))
    x = torch.randn(3, q.shape[1])
    assert run(x).shape == (3, 100)
    for row in x.split(1):
        assert_computes_the_codes(run, q, row, "w4a8")


def assert_computes_the_codes(run, q, x: torch.Tensor, name: str) -> None:
    """run(x [1, K]) is x @ W.T for the values q's codes stand for, up to the compute dtype and, for a kernel that
    rounds x as well, that rounding: half a step on each input times the row's absolute weights."""
    expected = F.linear(x.float(), q.dequantize())[0]  # [N]
    tolerance = 1e-4 if x.dtype == torch.float32 else 5e-2
    weights, xs = q.dequantize().abs(), x.float()[0]
    slack = 0
    if name == "fbgemm-dynamic":  # x rounded to 255 (or 127) steps over its range including 0
        slack = (xs.max().clamp_min(0) - xs.min().clamp_max(0)) / 127 / 2 * weights.sum(1)
    if name == "w4a8":  # x rounded to 127 steps of its largest magnitude per group of 32; float16 scales and mins
        steps = (xs.view(-1, GROUP_SIZE).abs().amax(-1) / 127).repeat_interleave(GROUP_SIZE)  # [K]
        slack = (weights * steps / 2).sum(1) + 2**-9 * (weights * xs.abs()).sum(1)
    got = run(x).float()[0]
    assert bool(((got - expected).abs() <= tolerance * (expected.abs() + expected.abs().max()) + slack).all()), name


def test_draft_weights_are_kept_on_disk_and_loaded_back(smollm2_fp32, tmp_path, monkeypatch):
    model, _ = smollm2_fp32
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    adapter = engine_adapter(model)
    first = _build(adapter, "int8")
    path = cache_path(adapter, "int8")
    assert path.exists() and path.suffix == ".safetensors"

    def no_quantizing(*args):
        raise AssertionError("the cached weights should have been loaded")

    monkeypatch.setattr("selfspec.drafts.lowbit.quantize", no_quantizing)
    again = _build(adapter, "int8")
    assert torch.equal(again.head.values, first.head.values) and torch.equal(again.head.scales, first.head.scales)
    assert set(again.kernels) == {"layers", "head"} and all(
        k.split()[0] in KERNELS["int8"] for k in again.kernels.values()
    )


def test_a_damaged_cache_file_is_made_again(smollm2_fp32, tmp_path, monkeypatch):
    model, _ = smollm2_fp32
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    adapter = engine_adapter(model)
    path = cache_path(adapter, "int4")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    weights = _build(adapter, "int4")
    assert weights.head.values.dtype == torch.uint8 and path.stat().st_size > 1_000_000


def test_subset_head_rows_take_the_frequent_tokens_then_the_lowest_ids():
    rows = subset_rows((900, 5, 900, 10_000_000), 6, 1000)
    assert rows.tolist() == [0, 1, 2, 3, 5, 900]


@pytest.mark.parametrize("precision, vocab", [("exact", 0), ("int4", 0), ("exact", 2048), ("int4", 1024)])
def test_a_draft_token_chosen_over_the_scored_tokens_is_the_full_rows_argmax(smollm2_fp32, precision, vocab):
    model, tok = smollm2_fp32
    adapter = engine_adapter(model)
    tokens = (4000, 17) if vocab else ()
    head = DraftHead(adapter, Schedule(head_precision=precision, head_vocab=vocab, head_tokens=tokens))
    head.begin(tok("Name the sea creatures: axolotl, narwhal").input_ids)  # rare tokens outside the subset
    h = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        logits = head(h)[0, -1]  # [V]: -inf outside what the head scores
        choice, scores, place = head.top(h)
    assert choice == int(logits.argmax()) and scores[place] == logits[choice]
    annealed = torch.softmax(logits / 1.7, dim=-1)[choice]
    assert torch.allclose(torch.softmax(scores / 1.7, dim=-1)[place], annealed, rtol=1e-5)
    assert len(scores) == (vocab + len(head.extra_rows) if vocab else model.config.vocab_size)


def test_greedy_choice_takes_the_first_of_tied_scores_as_argmax_does():
    scores = torch.randint(-5, 5, (4, 151_936), generator=torch.Generator().manual_seed(0)).bfloat16()
    scores[:, [70_000, 7, 151_000]] = 9.0  # three ties at every row's maximum
    assert greedy_index(scores).tolist() == scores.argmax(-1).tolist() == [7] * 4


def test_low_bit_drafts_read_a_fraction_of_the_bytes(smollm2_bf16):
    model, _ = smollm2_bf16
    full = step_weight_bytes(model)
    int4 = draft_weight_bytes(model, Schedule(int4_attn=EVERY, int4_mlp=EVERY, head_precision="int4", head_vocab=8192))
    exact = draft_weight_bytes(model, Schedule(max_draft=1))
    assert abs(exact - full) / full < 0.01  # the same matrices, norms aside
    assert int4 < 0.3 * full


@pytest.mark.parametrize(
    "schedule",
    [
        Schedule(int4_attn=EVERY, int4_mlp=EVERY, head_precision="int4", head_vocab=4096, max_draft=3),
        Schedule(int8_attn=EVERY, int8_mlp=EVERY, head_precision="int8", max_draft=4, confidence=0.3, anneal=1.0),
        Schedule(int4_mlp=tuple(range(8, 30)), skip_attn=(20,), exit_layer=26, head_vocab=2048, max_draft=5),
        Schedule(head_vocab=1024, max_draft=2, context_ngram=3),
        Schedule(
            int8_attn=tuple(range(10, 20)), exit_layers=(20, 25), head_precision="int4", max_draft=4, confidence=0.5
        ),
    ],
    ids=["int4-small-head", "int8", "mixed-skip-exit", "cheap-head-hybrid", "dynamic-exit"],
)
def test_low_bit_and_cheap_head_drafts_match_generate(smollm2_fp32, schedule):
    model, tokenizer = smollm2_fp32
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three rivers in Europe."}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )["input_ids"]  # fmt: skip
    expected = model.generate(ids, max_new_tokens=24, do_sample=False)
    fast = selfspec.wrap(model, schedule)
    assert torch.equal(fast.generate(ids, max_new_tokens=24, do_sample=False), expected)
    assert fast.last_stats.drafted > 0


def test_sampling_with_a_low_bit_draft_keeps_the_distribution(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    ids = tokenizer("The best thing about the ocean is", return_tensors="pt")["input_ids"]
    exact = exact_pair_distribution(model, ids)
    schedule = Schedule(int4_attn=EVERY, int4_mlp=EVERY, head_precision="int4", head_vocab=4096, max_draft=1)
    fast = selfspec.wrap(model, schedule)
    torch.manual_seed(0)
    out = fast.generate(
        ids.repeat(SAMPLES, 1), max_new_tokens=2, do_sample=True, temperature=TEMPERATURE, top_k=TOP_K, top_p=1.0
    )
    assert fast.last_stats.drafted == SAMPLES and 0 < fast.last_stats.accepted < SAMPLES
    assert p_value([tuple(r) for r in out[:, -2:].tolist()], exact) > 1e-3


def test_schedule_forms_are_validated_and_old_files_still_load(tmp_path):
    with pytest.raises(ScheduleError, match="in both skip_attn and int4_attn"):
        Schedule(skip_attn=(3,), int4_attn=(3, 4))
    with pytest.raises(ScheduleError, match="head_precision must be one of"):
        Schedule(head_precision="int2")
    with pytest.raises(ScheduleError, match="more than head_vocab"):
        Schedule(head_vocab=2, head_tokens=(1, 2, 3))
    schedule = Schedule(int4_mlp=(5, 6), head_precision="int8", head_vocab=4096, head_tokens=(7, 3))
    schedule.to_file(tmp_path / "s.json")
    assert Schedule.from_file(tmp_path / "s.json") == schedule
    (tmp_path / "old.json").write_text('{"format": "selfspec.schedule/1", "exit_layer": 20, "max_draft": 3}')
    old = Schedule.from_file(tmp_path / "old.json")
    assert old.exit_layer == 20 and old.inexact_layers == set() and old.head_precision == "exact"


def test_bad_low_bit_schedules_are_refused_on_the_model(smollm2_fp32):
    model, _ = smollm2_fp32
    with pytest.raises(ScheduleError, match=r"int4_mlp has layer indices \[30\]"):
        selfspec.wrap(model, Schedule(int4_mlp=(30,)))
    with pytest.raises(ScheduleError, match="outside this model's vocabulary"):
        selfspec.wrap(model, Schedule(head_vocab=8, head_tokens=(10**6,)))
    with pytest.raises(UnsupportedModelError, match="fused backend only"):
        selfspec.wrap(model, Schedule(int4_attn=(3,)), backend="reference")


def test_draft_weights_are_built_once_per_adapter(smollm2_fp32):
    model, _ = smollm2_fp32
    adapter = engine_adapter(model)
    assert draft_weights(adapter, "int4") is draft_weights(adapter, "int4")


def test_a_low_bit_draft_head_is_packed_once_not_at_every_generate(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    fast = selfspec.wrap(model, Schedule(int4_mlp=(0,), head_precision="int4", head_vocab=512))
    ids = tokenizer("The sea", return_tensors="pt").input_ids
    heads = draft_weights(engine_adapter(model), "int4").head_runs
    fast.generate(ids, max_new_tokens=4, do_sample=False)
    built = dict(heads)
    fast.generate(ids, max_new_tokens=4, do_sample=False)
    assert heads.keys() == built.keys() and all(heads[key][1] is built[key][1] for key in built)


def test_a_compiled_draft_through_the_w4a8_kernel_matches_generate(monkeypatch):
    # the graph calls the kernel itself (test_lossless's compiled low-bit test runs whichever kernel is fastest)
    monkeypatch.setitem(KERNELS, "int4", {"w4a8": KERNELS["int4"]["w4a8"]})
    model = tiny("qwen2")
    every = tuple(range(model.config.num_hidden_layers))
    schedule = Schedule(int4_attn=every, int4_mlp=every, head_precision="int4", max_draft=3)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    expected = model.generate(ids, max_new_tokens=16, do_sample=False)
    fast = selfspec.wrap(model, schedule, backend="compiled")
    assert torch.equal(fast.generate(ids, max_new_tokens=16), expected)
    assert fast.last_stats.layer_draft_steps > 0
    layers = draft_weights(engine_adapter(model), "int4").layers
    assert layers[0].qkv.kernel == "w4a8" and layers[0].qkv.traceable
