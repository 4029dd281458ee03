"""The `selfspec` command line, in-process (CliRunner) and as a real process."""

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from selfspec.cli import main


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "selfspec", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **env},
        timeout=300,
    )


def test_help_lists_the_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "generate" in result.output and "models" in result.output


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and "selfspec" in result.output


def test_models_table_shows_the_zoo(smollm2_fp32):
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    for name in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        assert name in result.stdout
    smol_row = next(line for line in result.stdout.splitlines() if "smollm2-135m" in line)
    assert "yes" in smol_row and "MB" in smol_row


def test_generate_prints_only_new_text(smollm2_fp32):
    result = _run("generate", "smollm2-135m", "What is the capital of France?", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "capital of France?" not in result.stdout  # the prompt is not echoed
    assert "Traceback" not in result.stderr


def test_generate_streams(smollm2_fp32):
    args = ["generate", "smollm2-135m", "Write a haiku about the sea.", "--max-new-tokens", "8", "--dtype", "fp32"]
    result = CliRunner().invoke(main, [*args, "--stream"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "no-such-model", "hi"],
        ["generate", "smollm2-135m", "hi", "--dtype", "int8"],
        ["generate", "smollm2-135m", "hi", "--max-new-tokens", "0"],
        ["generate", "smollm2-135m"],
        ["nosuchcommand"],
    ],
)
def test_user_errors_are_one_line_and_exit_2(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_bad_model_in_a_real_process_has_no_traceback(tmp_path):
    result = _run("generate", str(tmp_path / "nope"), "hi")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_unreachable_hub_id_is_one_clear_error():
    result = _run("generate", "no-such-org/no-such-model", "hi", HF_HUB_OFFLINE="1")
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot load 'no-such-org/no-such-model'"), result.stderr
    assert result.stderr.count("\n") == 1
