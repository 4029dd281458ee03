"""`selfspec eval`: prompt files, a tiny real run on smollm2-135m, partial reports, compare, the notebook."""

import json
from pathlib import Path

import nbformat
import pytest
import torch
from click.testing import CliRunner
from nbclient import NotebookClient
from selfspec.evals import command
from selfspec.evals.command import eval_command
from selfspec.evals.longform import longform_prompts
from selfspec.evals.prompts import load_prompts, select
from selfspec.evals.report import first_difference
from selfspec.search.surrogate import leviathan_bound

from selfspec import SelfspecError
from selfspec.schedule import FORMAT

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
RECORDS = [
    {"question_id": 1, "category": "writing", "turns": ["Write two sentences about autumn.", "Now make it rhyme."]},
    {"question_id": 2, "category": "coding", "turns": ["Write a Python function that adds two numbers."]},
    {"question_id": 3, "category": "writing", "turns": ["Describe a busy market in one paragraph."]},
    {"question_id": 4, "category": "math", "turns": ["What is 12 times 7?"]},
]
# one thread: on the shared 2-core boxes a second thread mostly waits on the first
TINY = ["--max-new-tokens", "16", "--dtype", "float32", "--threads", "1"]


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    return _jsonl(tmp_path_factory.mktemp("prompts") / "p.jsonl", [json.dumps(r) for r in RECORDS])


@pytest.fixture(scope="module")
def model_loads(smollm2_fp32):
    """The session's model in place of a fresh load per command run (loading is the slow part)."""

    def load(name: str, dtype: str, trust_remote_code: bool = False):
        assert (name, dtype, trust_remote_code) == ("smollm2-135m", "float32", False)
        return smollm2_fp32

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(command, "load_model", load)
        yield
    torch.set_num_threads(threads)  # --threads is process-wide; later test modules get theirs back


def _eval(*args: str):
    return CliRunner().invoke(eval_command, [*args])


@pytest.fixture(scope="module")
def finished(model_loads, prompt_file, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("eval")
    args = ["smollm2-135m", "--prompts", str(prompt_file), "--categories", "writing,coding", *TINY, "--out", str(out)]
    return out, _eval(*args, "--schedule", "early-exit")


# --- prompts ----------------------------------------------------------------------------------


def test_limit_is_per_category_and_keeps_file_order(prompt_file):
    prompts = load_prompts(prompt_file)
    assert [p.question_id for p in select(prompts, limit=1)] == [1, 2, 4]
    assert [p.question_id for p in select(prompts, ["writing", "math"])] == [1, 3, 4]
    assert prompts[0].text == RECORDS[0]["turns"][0]  # the first turn only


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"question_id": 1, "category": "a", "turns": ["x"]}', "not json"], "line 2 is not JSON"),
        (['{"question_id": 1, "turns": ["x"]}'], "line 1: missing field(s) category"),
        (['{"question_id": 1, "category": "a", "turns": []}'], "line 1: turns must be"),
        (["[1, 2]"], "line 1: expected a JSON object"),
        (['{"question_id": 1, "category": "all", "turns": ["x"]}'], "line 1: category 'all' is reserved"),
        (["", "  "], "holds no prompts"),
    ],
)
def test_malformed_prompt_files(tmp_path, lines, message):
    with pytest.raises(SelfspecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_prompts(_jsonl(tmp_path / "bad.jsonl", lines))


def test_missing_file_unknown_category_and_zero_limit(tmp_path, prompt_file):
    with pytest.raises(SelfspecError, match="cannot read prompts"):
        load_prompts(tmp_path / "absent.jsonl")
    prompts = load_prompts(prompt_file)
    with pytest.raises(SelfspecError, match="unknown categories poetry"):
        select(prompts, ["poetry"])
    with pytest.raises(SelfspecError, match="--limit must be >= 1"):
        select(prompts, limit=0)


def test_builtin_longform_set():
    prompts = longform_prompts()
    assert len(prompts) >= 12
    assert {p.category for p in prompts} == {"essay", "story", "explain", "code"}


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 9, 3], [1, 2, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


# --- the command ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--limit", "0"], "--limit must be >= 1"),
        (["--prompts", "/nonexistent/p.jsonl"], "cannot read prompts"),
        (["--baselines", "generate,beam"], "unknown baselines beam"),
        (["--dtype", "int3"], "unsupported dtype"),
    ],
)
def test_bad_arguments_fail_before_loading(args, message):
    result = _eval("no-such-model", *args)  # an unknown model would fail later, at load time
    assert isinstance(result.exception, SelfspecError)
    assert message in str(result.exception)


def test_usage_errors(tmp_path):
    assert "--seed applies to --sample only" in _eval("smollm2-135m", "--seed", "3").output
    report = _jsonl(tmp_path / "r.json", ["{}"])
    assert "give no MODEL" in _eval("smollm2-135m", "--compare", str(report), str(report)).output
    result = _eval("--compare", str(report), str(report))
    assert isinstance(result.exception, SelfspecError) and "not a selfspec eval report" in str(result.exception)


def test_run_writes_table_json_and_plot(finished):
    out, result = finished
    assert result.exit_code == 0, result.output
    assert "selfspec eval" in result.output and "lossless" in result.output
    assert (out / "report.png").stat().st_size > 10_000
    report = json.loads((out / "report.json").read_text())
    assert report["partial"] is False
    assert report["methods"] == ["generate", "plain", "prompt_lookup", "selfspec"]
    assert report["categories"] == ["writing", "coding"]
    assert {"torch", "transformers", "selfspec", "device", "torch_threads", "dtype"} <= set(report["environment"])
    assert report["environment"]["dtype"] == "float32"
    assert report["schedule"]["format"] == FORMAT and report["environment"]["cpu_flags"]
    assert report["schedule_source"] == "named 'early-exit'" and "named 'early-exit'" in result.output
    # the early-exit recipe drafts with layers: their live alpha, c and bound are reported against the plain loop
    drafted = report["summary"]["all"]["selfspec"]
    assert 0 <= drafted["layer_alpha"] <= 1 and drafted["layer_c"] > 0
    gamma = report["schedule"]["max_draft"]
    assert drafted["layer_bound"] == pytest.approx(
        leviathan_bound(drafted["layer_alpha"], gamma, drafted["layer_c"]), abs=2e-3
    )
    # the speedup held against the bound leaves out the prompt pass, which every method pays alike
    stats = [[r["methods"][m]["stats"] for r in report["records"]] for m in ("selfspec", "plain")]
    assert all(0 < s["prefill_seconds"] < s["seconds"] for method in stats for s in method)
    per_token = [sum(s["seconds"] - s["prefill_seconds"] for s in m) / sum(s["new_tokens"] for s in m) for m in stats]
    assert drafted["decode_speedup"] == pytest.approx(per_token[1] / per_token[0], rel=1e-2)
    assert "layer draft, measured: alpha" in result.output and "of the bound" in result.output
    assert [r["question_id"] for r in report["records"]] == [1, 2, 3]
    assert list(report["summary"]) == ["all", "writing", "coding"]
    selfspec_all = report["summary"]["all"]["selfspec"]
    assert selfspec_all["rounds"] == sum(selfspec_all["accepted_lengths"].values())
    assert selfspec_all["tokens_per_second"] > 0 and selfspec_all["speedup_vs_plain"] > 0
    for method in ("generate", "plain", "selfspec"):  # float32: token for token the same
        assert report["summary"]["all"][method]["agreement"] == 1.0
        assert all(r["methods"][method]["identical"] for r in report["records"])


def test_interrupt_writes_a_partial_report(model_loads, prompt_file, tmp_path, monkeypatch):
    real = command.run_eval

    def first_prompt_then_ctrl_c(*args, **kwargs):
        yield next(real(*args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "run_eval", first_prompt_then_ctrl_c)
    result = _eval("smollm2-135m", "--prompts", str(prompt_file), "--baselines", "", *TINY, "--out", str(tmp_path))
    assert result.exit_code == 130, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["partial"] is True
    assert report["methods"] == ["generate", "selfspec"]
    assert len(report["records"]) == 1 and report["summary"]["all"]["selfspec"]["prompts"] == 1


def test_compare_prints_both_reports(finished, tmp_path):
    out, _ = finished
    other = json.loads((out / "report.json").read_text())
    other["summary"]["all"]["selfspec"]["tokens_per_second"] *= 2
    b = tmp_path / "b.json"
    b.write_text(json.dumps(other))
    result = _eval("--compare", str(out / "report.json"), str(b))
    assert result.exit_code == 0, result.output
    assert "comparison" in result.output and "B/A" in result.output
    row = next(line for line in result.output.splitlines() if "│ all " in line and "selfspec" in line)
    assert "2.00" in row  # B/A of the doubled tokens/s


# --- the notebook -----------------------------------------------------------------------------


def test_quickstart_notebook_runs(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read by torch in the kernel
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    parameters.source = "MAX_NEW_TOKENS = 16\nTUNE_TRIALS = 4"
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "identical to model.generate: True" in text
    assert "image/png" in outputs[-1]["data"]
