"""Bad input gets one clear line and a non-zero exit (CLI) or a specific exception (API); nothing partial is left
behind; nothing untrusted runs."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import selfspec
from selfspec import GenerationInputError, ScheduleError, SelfspecError, UnsupportedModelError
from selfspec.cli import main
from selfspec.files import write_json_atomic


def one_line_error(args: list[str], contains: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert contains in lines[0], lines[0]


@pytest.fixture
def schedule_file(tmp_path: Path):
    def write(data) -> Path:
        path = tmp_path / "s.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return path

    return write


@pytest.mark.parametrize(
    "data, message",
    [
        ("{not json", "is not valid JSON"),
        ({"format": "selfspec.schedule/0"}, "schedule format is 'selfspec.schedule/0'"),
        ({"skip_attn": [1]}, "schedule format is None"),
        ({"format": "selfspec.schedule/1", "max_draft": -2}, "max_draft must be an integer >= 0"),
        ({"format": "selfspec.schedule/1", "anneal": -0.5}, "anneal must be a number >= 0"),
        ({"format": "selfspec.schedule/1", "exit_layer": 0}, "exit_layer must be None or an integer >= 1"),
        ({"format": "selfspec.schedule/1", "skip_attn": [30]}, "outside [0, 29]"),
        ({"format": "selfspec.schedule/1", "exit_layers": [31]}, "outside [1, 30]"),
        ({"format": "selfspec.schedule/1", "bogus": 1}, "unknown schedule fields ['bogus']"),
        ({"format": "selfspec.schedule/1", "context_ngram": 99}, "context_ngram must be an integer in [0, 8]"),
    ],
)
def test_bad_schedules_are_one_line_errors(smollm2_fp32, schedule_file, data, message):
    path = schedule_file(data)
    one_line_error(["generate", "smollm2-135m", "hi", "--dtype", "float32", "--schedule", str(path)], message)
    with pytest.raises(ScheduleError, match=message.replace("[", r"\[").replace("(", r"\(")):
        selfspec.wrap(smollm2_fp32[0], selfspec.Schedule.from_file(path))


@pytest.mark.xdist_group("qwen05")  # one worker holds the float32 qwen (~5 GB with its derived weights)
def test_a_schedule_for_another_model_is_refused_and_another_dtype_warned(smollm2_fp32, qwen05_fp32, tmp_path):
    from selfspec.fingerprint import model_identity

    smol, qwen = smollm2_fp32[0], qwen05_fp32[0]
    schedule = selfspec.Schedule(exit_layer=20, max_draft=2).with_meta(
        model=model_identity(qwen, "qwen2.5-coder-0.5b"), dtype="float32", device="cpu"
    )
    with pytest.raises(ScheduleError, match="tuned for qwen2.5-coder-0.5b .* not for this model"):
        selfspec.wrap(smol, schedule)
    path = tmp_path / "qwen.json"
    schedule.to_file(path)
    one_line_error(["generate", "smollm2-135m", "hi", "--schedule", str(path)], "run `selfspec tune` for this model")
    with pytest.warns(UserWarning, match="tuned for dtype bfloat16, running on float32"):
        selfspec.wrap(qwen, schedule.with_meta(dtype="bfloat16"))


def test_prompt_past_the_context_is_refused_before_any_work(smollm2_fp32):
    model, _ = smollm2_fp32
    limit = model.config.max_position_embeddings
    ids = torch.ones((1, limit), dtype=torch.long)
    with pytest.raises(GenerationInputError, match=f"exceeds the model's context of {limit}"):
        selfspec.wrap(model, selfspec.Schedule.plain()).generate(ids, max_new_tokens=1)


def test_remote_code_is_refused_unless_trusted(tmp_path):
    model_dir = tmp_path / "custom"
    model_dir.mkdir()
    config = {"model_type": "mycustom", "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}
    (model_dir / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (model_dir / "configuration_my.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (model_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match="ships its own modelling code.*--trust-remote-code"):
        selfspec.load_model(str(model_dir))
    one_line_error(["generate", str(model_dir), "hi"], "never runs by default")
    assert not marker.exists()


def test_unwritable_outputs_fail_before_loading_anything(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "x.json"  # a path under a regular file can never be created
    one_line_error(["tune", "smollm2-135m", "--out", str(out)], f"cannot write {out}")
    one_line_error(
        ["eval", "smollm2-135m", "--out", str(blocker / "d")], f"cannot write {blocker / 'd' / 'report.json'}"
    )
    one_line_error(["eval", "smollm2-135m", "--out", str(blocker)], "is a file")
    with pytest.raises(SelfspecError, match="cannot write"):
        write_json_atomic(out, {"a": 1})


def test_an_unwritable_model_cache_says_what_to_do(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SELFSPEC_CACHE", str(blocker / "cache"))
    one_line_error(["generate", "smollm2-135m", "hi"], "set SELFSPEC_CACHE to a writable folder")


def test_atomic_write_keeps_the_old_file_when_the_new_one_cannot_be_made(tmp_path):
    path = tmp_path / "s.json"
    selfspec.Schedule(max_draft=2).to_file(path)
    before = path.read_text()
    with pytest.raises(TypeError):
        write_json_atomic(path, {"not serialisable": object()})
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temp file left behind
