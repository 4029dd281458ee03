"""The compiled one-token step: token-exact in float32, measured once per machine, its compile cached on disk."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_architectures import SCHEDULES, tiny
from torch._dynamo.utils import counters

import selfspec
from selfspec import compiled
from selfspec.errors import GenerationInputError
from selfspec.fused import FUSED_FAMILIES, engine_adapter


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_compiled_step_matches_generate(family):
    model = tiny(family)
    for length in (9, 1):  # a one-token prompt starts at position 0, which stays eager
        ids = torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(1))
        expected = model.generate(ids, max_new_tokens=20, do_sample=False)
        for schedule in SCHEDULES:
            fast = selfspec.wrap(model, schedule, backend="compiled")
            assert torch.equal(fast.generate(ids, max_new_tokens=20), expected), schedule
    assert engine_adapter(model).derived["step"].compile_seconds > 0  # the graph ran


def test_one_graph_serves_every_position_and_cache_length():
    model = tiny("llama")
    fast = selfspec.wrap(model, backend="compiled")
    graphs = counters["stats"]["unique_graphs"]
    for length, new_tokens in ((9, 12), (3, 30), (25, 4), (2, 2)):  # cache lengths 21, 33, 29, 4; steps reach the end
        ids = torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(length))
        expected = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        assert torch.equal(fast.generate(ids, max_new_tokens=new_tokens), expected)
    compiled.measure(engine_adapter(model))  # its scratch cache, timed up to its last position
    assert counters["stats"]["unique_graphs"] == graphs + 1


def test_auto_measures_once_and_keeps_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    measured = []
    measure = compiled.measure
    monkeypatch.setattr(compiled, "measure", lambda adapter: measured.append(adapter) or measure(adapter))
    first = engine_adapter(tiny("llama"))
    compiled.decode_step(first, "auto")
    path = compiled.record_path(first)
    record = json.loads(path.read_text())
    assert record["eager_ms"] > 0 and record["compiled_ms"] > 0 and record["compile_seconds"] > 0
    assert record["compiled_wins"] == (record["compiled_ms"] < record["eager_ms"])
    step = compiled.decode_step(first, "auto")
    assert (step is not None) == record["compiled_wins"]
    second = engine_adapter(tiny("llama"))  # the same model again, as a new process would load it
    assert (compiled.decode_step(second, "auto") is not None) == record["compiled_wins"]
    assert measured == [first]
    path.write_text("{not json")  # a damaged record is measured again
    compiled.decode_step(engine_adapter(tiny("llama")), "auto")
    assert len(measured) == 2 and json.loads(path.read_text())["eager_ms"] > 0


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
    assert first == [0, 1] and second == [1, 0]
