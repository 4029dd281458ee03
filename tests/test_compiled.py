"""The compiled full-depth passes (the one-token step, verify widths padded to buckets): token-exact in float32,
measured once per machine and bucket, their compile cached on disk."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_architectures import SCHEDULES, tiny
from torch._dynamo.utils import counters

import selfspec
from selfspec.cpu import kernel_setting
from selfspec.engine import compiled
from selfspec.engine.families import FAMILIES
from selfspec.engine.fused import engine_adapter
from selfspec.errors import GenerationInputError

# verified from layer 0 at widths 2 to 7: every bucket up to 8, some of them padded
CONTEXT_COPIES = [selfspec.Schedule(max_draft=0, context_ngram=1, context_max_draft=w) for w in (1, 2, 6)]


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_step_matches_generate(family):
    model = tiny(family)
    # a prompt that repeats itself, so the copies verify from layer 0 whatever the random model writes; and a one-token
    # prompt, which starts at position 0 (eager)
    for ids in (torch.arange(9)[None] % 4 + 3, torch.tensor([[7]])):
        expected = model.generate(ids, max_new_tokens=20, do_sample=False)
        for schedule in SCHEDULES + CONTEXT_COPIES:
            fast = selfspec.wrap(model, schedule, backend="compiled")
            assert torch.equal(fast.generate(ids, max_new_tokens=20), expected), schedule
    assert set(engine_adapter(model).derived["step"].compile_seconds) >= {1, 2, 4}  # graphs ran, padded widths


def test_one_graph_serves_every_position_and_cache_length():
    model = tiny("llama")
    fast = selfspec.wrap(model, selfspec.Schedule.plain(), backend="compiled")
    graphs = counters["stats"]["unique_graphs"]
    for length, new_tokens in ((9, 12), (3, 30), (25, 4), (2, 2)):  # cache lengths 21, 33, 29, 4; steps reach the end
        ids = torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(length))
        expected = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        assert torch.equal(fast.generate(ids, max_new_tokens=new_tokens), expected)
    compiled.measure(engine_adapter(model))  # its own scratch cache, timed up to its last position
    assert counters["stats"]["unique_graphs"] == graphs + 1


def test_auto_times_each_bucket_in_the_first_three_processes_and_keeps_their_mean(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))

    def new_process() -> None:
        monkeypatch.setattr(compiled, "_sampled_here", set())

    timed: list[tuple[int, compiled.StepRecord]] = []
    measure = compiled.measure
    monkeypatch.setattr(compiled, "measure", lambda a, width: timed.append((width, measure(a, width))) or timed[-1][1])
    new_process()
    first = engine_adapter(tiny("llama"))
    compiled.decode_step(first, "auto")  # a plain loop: the one-token step only
    compiled.decode_step(first, "auto", max_width=3)  # drafts verified 3 wide: buckets 2 and 4 as well
    assert [width for width, _ in timed] == [1, 2, 4]
    path = compiled.record_path(first)
    records = json.loads(path.read_text())
    assert sorted(records) == ["1", "2", "4"]
    for record in records.values():
        assert record["eager_ms"] > 0 and record["compiled_ms"] > 0 and record["compile_seconds"] > 0
        assert record["compiled_wins"] == (record["compiled_ms"] < record["eager_ms"]) and record["samples"] == 1
    passes = compiled.decode_step(first, "auto", max_width=4)
    wins = {int(width): record["compiled_wins"] for width, record in records.items()}
    for width, bucket in ((1, 1), (2, 2), (3, 4), (4, 4)):
        assert (passes.bucket(width) if passes else None) == (bucket if wins[bucket] else None)
    compiled.decode_step(engine_adapter(tiny("llama")), "auto", max_width=4)  # the same process: no second timing
    assert len(timed) == 3
    for _ in range(compiled.RECORD_SAMPLES):  # two more processes time each bucket; the fourth reads the record
        new_process()
        compiled.decode_step(engine_adapter(tiny("llama")), "auto", max_width=3)
    assert [width for width, _ in timed] == [1, 2, 4] * compiled.RECORD_SAMPLES
    records = json.loads(path.read_text())
    for width, record in records.items():
        samples = [r for w, r in timed if w == int(width)]
        assert record["samples"] == compiled.RECORD_SAMPLES
        assert record["eager_ms"] == pytest.approx(sum(r.eager_ms for r in samples) / len(samples))
        assert record["compiled_ms"] == pytest.approx(sum(r.compiled_ms for r in samples) / len(samples))
        assert record["compiled_wins"] == (record["compiled_ms"] < record["eager_ms"])
    path.write_text("{not json")  # a damaged record is timed again
    new_process()
    compiled.decode_step(engine_adapter(tiny("llama")), "auto")
    assert len(timed) == 10 and json.loads(path.read_text())["1"]["samples"] == 1


def test_auto_measures_a_draft_plan_once_and_drafts_through_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    monkeypatch.setenv("SELFSPEC_DECODE_STEP", "auto")
    measured = []
    measure = compiled.measure_segment
    monkeypatch.setattr(compiled, "measure_segment", lambda seg: measured.append((seg.first, seg.stop)) or measure(seg))
    model = tiny("qwen2")
    schedule = selfspec.Schedule(skip_attn=(1,), exit_layer=3, max_draft=3)  # exact to layer 1, then skips
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    expected = model.generate(ids, max_new_tokens=16, do_sample=False)
    for _ in range(2):  # the second wrap reads the record
        fast = selfspec.wrap(model, schedule)
        assert torch.equal(fast.generate(ids, max_new_tokens=16), expected)
    assert measured == [(0, 1), (1, 3)]  # one graph per stretch between the draft's boundaries
    records = sorted((tmp_path / "steps").glob("*-draft-*.json"))
    assert len(records) == 2
    for path in records:
        record = json.loads(path.read_text())["1"]
        assert record["eager_ms"] > 0 and record["compiled_ms"] > 0
        assert record["compiled_wins"] == (record["compiled_ms"] < record["eager_ms"])
    assert fast.last_stats.layer_draft_steps > 0


def test_a_capped_onednn_isa_keeps_its_own_timings(monkeypatch):
    # with AMX capped off, bf16 stays packed but oneDNN runs other kernels: a timing of one is not the other's
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    adapter = engine_adapter(tiny("llama"))
    uncapped = compiled.record_path(adapter)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert "oneDNN ISA up to AVX512_CORE_BF16" in kernel_setting()
    assert compiled.record_path(adapter) != uncapped


def test_eager_never_compiles_and_a_bad_setting_is_one_clear_error(monkeypatch):
    model = tiny("qwen2")
    assert compiled.decode_step(engine_adapter(model), "eager") is None
    monkeypatch.setenv("SELFSPEC_DECODE_STEP", "fastest")
    with pytest.raises(GenerationInputError, match="SELFSPEC_DECODE_STEP must be auto, eager or compiled"):
        selfspec.wrap(model)


GENERATE_ONCE = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_architectures import tiny
from torch._dynamo.utils import counters
import selfspec
model = tiny("mistral")
ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(1))
expected = model.generate(ids, max_new_tokens=12, do_sample=False)
assert torch.equal(selfspec.wrap(model, backend="compiled").generate(ids, max_new_tokens=12), expected)
print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


def test_a_second_process_loads_the_compile_from_disk(tmp_path):
    script = GENERATE_ONCE.format(tests=os.path.dirname(__file__))
    env = os.environ | {"SELFSPEC_CACHE": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = ([int(n) for n in run.stdout.split()] for run in runs)
    # the step and the default schedule's draft layers: compiled by the first process, loaded by the second
    assert first == [0, 2] and second == [2, 0]
