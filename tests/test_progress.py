"""Progress in a log: plain lines at each phase change and a timed line while a phase runs."""

import io
import os
import re
import subprocess
import sys
import time

import pytest
from test_tune import store_small_calibration, write_prompts

from selfspec.progress import Lines


def test_lines_tell_phases_and_the_latest_state_on_a_timer():
    out = io.StringIO()
    with Lines("tune", out, interval=0.05) as lines:
        lines.stage("loading")
        time.sleep(0.2)
        lines.phase("search", 10, "trials", timeout=60)
        lines.advance(4, "best predicted 1.100x")
        time.sleep(0.2)  # no trial finishes meanwhile: the timer still prints
    printed = out.getvalue().splitlines()
    assert printed[0] == "[tune] loading"
    assert "[tune] search: 0/10 trials" in printed
    beats = [
        line for line in printed if re.fullmatch(r"\[tune\] search: 4/10 trials, best predicted 1.100x, ETA \d+s", line)
    ]
    assert len(beats) >= 2
    assert re.fullmatch(r"\[tune\] search: 4/10 trials, best predicted 1.100x, \d+s", printed[-1])  # the phase's end
    assert not lines.timer.is_alive()


def test_the_timer_sleeps_before_the_first_phase():
    out = io.StringIO()
    cpu = time.process_time()
    with Lines("eval", out, interval=0.02):
        time.sleep(0.5)  # nothing to report yet: the timer must wait, not spin on the lock (it held the GIL)
    assert time.process_time() - cpu < 0.2 and out.getvalue() == ""


def test_ctrl_c_stops_the_timer():
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt), Lines("eval", out, interval=0.01) as lines:
        lines.phase("generations", 4, "runs")
        raise KeyboardInterrupt
    assert not lines.timer.is_alive()
    settled = out.getvalue()
    time.sleep(0.05)
    assert out.getvalue() == settled


def test_tune_into_a_log_prints_progress_lines(smollm2_fp32, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    storage, study = f"sqlite:///{tmp_path / 'study.db'}", "logged"
    store_small_calibration(smollm2_fp32, prompts, storage, study)

    args = ["tune", "smollm2-135m", "--dtype", "float32", "--threads", "1", "--prompts", str(prompts)]
    args += ["--storage", storage, "--study", study, "--trials", "3", "--finalists", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "selfspec", *args, "--out", str(tmp_path / "s.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SELFSPEC_PROGRESS_SECONDS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("[tune] ")]
    assert lines[0] == "[tune] loading smollm2-135m (float32)"
    assert "[tune] teacher-forced passes over the calibration texts" in lines
    assert "[tune] search: 0/3 trials" in lines
    assert any(re.match(r"\[tune\] search: 3/3 trials, best predicted \d\.\d{3}x, \d+s$", line) for line in lines)
    measure = [line for line in lines if line.startswith("[tune] measure: ")]
    first = re.fullmatch(r"\[tune\] measure: 0/(\d) runs", measure[0])  # the plain loop and any finalists
    assert first, lines
    runs = first[1]
    assert re.match(rf"\[tune\] measure: {runs}/{runs} runs, best measured (-|\d\.\d{{3}}x), \d+s$", measure[-1])
    # timed generations take seconds: the 1-s timer repeats the state while they run
    assert len(measure) >= 3, lines
    assert "finalists timed against the plain loop" in result.stdout
