"""What runs without a schedule: the schedule tune recorded for this model, dtype and machine, else the built-in
default; a record from another machine or model is not used, a damaged one is ignored with a warning."""

import json

import pytest
import torch
from click.testing import CliRunner
from test_architectures import tiny

import selfspec
from selfspec.cli import main
from selfspec.schedule import record
from selfspec.schedule.presets import builtin_default, early_exit
from selfspec.schedule.recorded import STORE_ENV, key_of, lookup

TUNED = selfspec.Schedule(exit_layer=20, max_draft=3, confidence=0.5, context_ngram=3, context_max_draft=6)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv(STORE_ENV, str(tmp_path))
    return tmp_path


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_without_a_record_wrap_runs_the_builtin_default(smollm2_fp32, store, capfd):
    fast = selfspec.wrap(smollm2_fp32[0])
    assert fast.schedule == builtin_default(30) and fast.schedule_source.startswith("built-in default")
    assert "selfspec: schedule" in capfd.readouterr().err  # says which, on stderr


def test_a_recorded_schedule_is_run_and_stays_lossless(smollm2_fp32, store, capfd):
    model, tokenizer = smollm2_fp32
    path = record(TUNED, model, "smollm2-135m")
    assert path.parent == store and json.loads(path.read_text())["key"] == key_of(model)
    fast = selfspec.wrap(model)
    assert fast.schedule == TUNED and str(path) in fast.schedule_source
    assert "recorded by `selfspec tune smollm2-135m` on this machine" in capfd.readouterr().err
    ids = tokenizer("The recipe calls for flour, sugar and", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(fast.generate(ids, max_new_tokens=24, do_sample=False), expected)
    assert selfspec.wrap(model, selfspec.Schedule.plain()).schedule == selfspec.Schedule.plain()  # explicit wins


def test_a_record_from_another_machine_key_is_not_used(smollm2_fp32, store, threads, monkeypatch):
    model = smollm2_fp32[0]
    record(TUNED, model, "smollm2-135m")
    torch.set_num_threads(threads + 1)  # another thread count is another machine key: timings differ there
    assert lookup(model) is None and selfspec.wrap(model).schedule == builtin_default(30)
    torch.set_num_threads(threads)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # other kernels, as on a CPU without AVX-512
    assert lookup(model) is None
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert lookup(model).schedule == TUNED


def test_a_record_of_another_model_is_not_used(smollm2_fp32, store):
    record(TUNED, smollm2_fp32[0], "smollm2-135m")
    other = tiny("llama")
    assert lookup(other) is None
    assert selfspec.wrap(other).schedule == builtin_default(other.config.num_hidden_layers)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: "{ not json",
        lambda data: json.dumps(data | {"format": "selfspec.recorded-schedule/0"}),
        lambda data: json.dumps(data | {"schedule": data["schedule"] | {"max_draft": -1}}),
        lambda data: json.dumps(data | {"key": data["key"] | {"fingerprint": "0123456789abcdef"}}),
    ],
    ids=["not-json", "other-format", "invalid-schedule", "key-of-another-model"],
)
def test_a_damaged_record_is_ignored_with_a_warning(smollm2_fp32, store, damage):
    model = smollm2_fp32[0]
    path = record(TUNED, model, "smollm2-135m")
    path.write_text(damage(json.loads(path.read_text())))
    with pytest.warns(RuntimeWarning, match="ignoring the recorded schedule .*selfspec tune. writes a new one"):
        fast = selfspec.wrap(model)
    assert fast.schedule == builtin_default(30)


def test_the_commands_say_which_schedule_they_run(smollm2_fp32, store, threads):
    model = smollm2_fp32[0]
    runner = CliRunner()
    args = ["generate", "smollm2-135m", "Say hi.", "--max-new-tokens", "4", "--dtype", "float32", "--threads", "1"]
    named = runner.invoke(main, [*args, "--schedule", "plain"])
    assert named.exit_code == 0, named.output
    assert "selfspec: schedule plain loop (drafting off): named 'plain'" in named.stderr
    record(TUNED, model, "smollm2-135m")
    recorded = runner.invoke(main, args)
    assert recorded.exit_code == 0, recorded.output
    assert "recorded by `selfspec tune smollm2-135m`" in recorded.stderr and recorded.stdout.strip()
    bad = runner.invoke(main, [*args, "--schedule", "fastest"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "--schedule takes a schedule file or one of: plain, default, early-exit" in bad.stderr
    listed = CliRunner(env={"COLUMNS": "220"}).invoke(main, ["models"])
    assert listed.exit_code == 0, listed.output
    assert "recorded on this machine" in listed.stdout and "float32" in listed.stdout


def test_the_early_exit_recipe_is_a_named_starting_point_of_tune():
    from selfspec.search import space

    assert early_exit(30) in space.seeds(30) and early_exit(30) != builtin_default(30)
