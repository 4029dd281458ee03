"""`selfspec tune` on the real smollm2-135m with tiny budgets: surrogate sanity, the written schedule, resume,
and two worker processes sharing one study."""

import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner
from selfspec.search import command, space
from selfspec.search.anneal import GRID, expected_calibration_error, fit_anneal
from selfspec.search.command import calibrate_command, tune_command
from selfspec.search.costs import Costs, measure_costs
from selfspec.search.prompts import BUILTIN, read_prompts, split
from selfspec.search.surrogate import drafter_for, early_texts, leviathan_bound, predict, prepare, score, simulate
from selfspec.search.teacher import Continuation, encode_prompt, frequent_tokens, greedy_continuations
from selfspec.search.tune import TuneConfig, completed, open_study, tune
from test_architectures import tiny

import selfspec
from selfspec import SelfspecError
from selfspec.drafts.head import subset_rows
from selfspec.schedule import FORMAT
from selfspec.schedule.presets import builtin_default

# short replies keep the calibration and timed runs small
SHORT = [BUILTIN[5], BUILTIN[1], BUILTIN[14]]


def write_prompts(path: Path) -> Path:
    lines = [json.dumps({"question_id": p.question_id, "category": p.category, "turns": [p.text]}) for p in SHORT]
    path.write_text("\n".join(lines) + "\n")
    return path


def store_small_calibration(smollm2: tuple, prompts: Path, storage: str, study: str) -> None:
    """Start `study` with small calibration texts and costs (and one trial), so the tune workers started on it
    go straight to their search. On one torch thread: two can collapse on a busy 2-core machine."""
    model, tokenizer = smollm2
    calibration, held_out = split(read_prompts(prompts))
    config = TuneConfig(
        prompts.with_suffix(".json"), storage, study, trials=1, finalists=0, calibration_tokens=16, cost_repeats=3
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tune(model, tokenizer, "smollm2-135m", calibration, held_out, config)
    finally:
        torch.set_num_threads(threads)


def study_trials(storage: str, name: str) -> int:
    return len(completed(optuna.load_study(study_name=name, storage=storage)))


@pytest.fixture
def one_thread():
    # timings on a shared 2-core machine are steadier with one thread; the command sets it process-wide
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calibrated(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    continuations = greedy_continuations(model, tokenizer, [p.text for p in SHORT[:2]], 16)
    return prepare(model, continuations), measure_costs(model, kv_length=64, max_tokens=5, repeats=3)


def test_a_cheap_head_is_scored_over_tokens_ranked_on_the_other_texts(smollm2_fp32, calibrated):
    model, _ = smollm2_fp32
    texts, _ = calibrated
    continuations = [Continuation(t.tokens, int(t.positions[0]) + 1) for t in texts]
    assert [t.head_ranking for t in texts] == [frequent_tokens(continuations[1:]), frequent_tokens(continuations[:1])]
    vocab = 64  # every token of both continuations fits: ranked in-sample, this head would miss none of them
    schedule = selfspec.Schedule(head_vocab=vocab, head_tokens=frequent_tokens(continuations)[:vocab], max_draft=2)
    missed = 0
    for text, scored in zip(texts, score(model, texts, schedule)):
        head_rows = set(subset_rows(text.head_ranking[:vocab], vocab, model.config.vocab_size).tolist())
        for target, agree in zip(text.targets.tolist(), scored.agree):
            if target not in head_rows | set(text.prompt):
                missed += 1
                assert not agree  # a token its head does not score is never drafted
    assert missed > 0


def test_full_depth_draft_agrees_everywhere(smollm2_fp32, calibrated):
    model, _ = smollm2_fp32
    texts, costs = calibrated
    full = selfspec.Schedule(max_draft=4)
    scored = score(model, texts, full)
    assert all(all(s.agree) for s in scored)
    assert all(0.0 <= c <= 1.0 for s in scored for c in s.confidence)
    prediction = predict(model, texts, costs, full)
    assert prediction.agreement == 1.0
    # 16 positions a text: three full rounds of 4 drafts + 1, then one plain step
    assert prediction.accepted_length == pytest.approx(4.0)
    assert 0.9 < prediction.draft_cost < 1.3


def test_shallow_drafts_are_cheaper_and_agree_less(smollm2_fp32, calibrated):
    model, _ = smollm2_fp32
    texts, costs = calibrated
    shallow = predict(model, texts, costs, selfspec.Schedule(exit_layer=15, max_draft=3, anneal=1.0, confidence=0.5))
    skipping = predict(model, texts, costs, selfspec.Schedule(skip_attn=(20, 24), max_draft=2))
    for p in (shallow, skipping):
        assert 0.0 <= p.agreement < 1.0
        assert 1.0 <= p.accepted_length <= 4.0
        assert 0.0 < p.speedup < 5.0 and math.isfinite(p.bound)
    assert shallow.draft_cost < 0.8 < skipping.draft_cost
    assert shallow.agreement < skipping.agreement
    assert shallow.bound == pytest.approx(leviathan_bound(shallow.agreement, 3, shallow.draft_cost))


def test_a_schedule_far_below_the_best_is_pruned_on_the_early_texts(smollm2_fp32, calibrated):
    model, _ = smollm2_fp32
    texts, costs = calibrated
    schedule = selfspec.Schedule(exit_layer=15, max_draft=3, anneal=1.0, confidence=0.5)
    whole = predict(model, texts, costs, schedule)
    first = early_texts(len(texts))
    early = predict(model, texts[:first], costs, schedule)
    assert whole.texts == len(texts) > first and whole.early_speedup == pytest.approx(early.speedup)
    pruned = predict(model, texts, costs, schedule, prune_below=whole.early_speedup * 1.01)
    assert pruned.texts == first and pruned.speedup == pytest.approx(early.speedup)
    assert pruned.agreement == pytest.approx(early.agreement)
    kept = predict(model, texts, costs, schedule, prune_below=whole.early_speedup)
    assert kept.texts == len(texts) and kept.speedup == pytest.approx(whole.speedup)


@pytest.mark.parametrize(
    "schedule",
    [
        selfspec.Schedule(exit_layer=20, max_draft=4, anneal=1.0, confidence=0.5),
        selfspec.Schedule(exit_layer=14, max_draft=5, anneal=0.5, confidence=0.3, adaptive_width=True),
    ],
)
def test_replay_has_the_live_loops_rounds(smollm2_fp32, calibrated, schedule):
    """An exit draft with no skip computes its layers exactly, so teacher forcing sees what decoding sees: in
    float32 the replay must end its rounds where the live loop does (width, unsure token, adaptive width)."""
    model, _ = smollm2_fp32
    texts, costs = calibrated
    drafter = drafter_for(model, schedule)
    replay = simulate(texts, score(model, texts, schedule), schedule, costs, drafter.exact_depth, 0.5 * costs.step)
    fast = selfspec.wrap(model, schedule, backend="eager")
    live_rounds = 0
    for text in texts:
        prompt = torch.tensor([text.prompt])
        out = fast.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(text.positions))
        assert out[0].tolist() == text.tokens.tolist()
        live_rounds += fast.last_stats.rounds
    assert replay.tokens == sum(len(t.positions) for t in texts)
    assert replay.rounds == live_rounds


def test_costs_price_passes_as_decoding_runs_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    model = tiny("llama")
    eager = measure_costs(model, kv_length=32, max_tokens=3, repeats=2, mode="eager")
    assert eager.full_verify == () and eager.draft_speed == {} and eager.step == eager.verify[0]
    costs = measure_costs(model, kv_length=32, max_tokens=3, repeats=2, mode="compiled")
    adapter = selfspec.engine.fused.engine_adapter(model)
    # the full-depth passes priced ran through the graphs decoding runs: widths 1-3 in buckets 1, 2 and 4
    assert set(adapter.derived["step"].compile_seconds) == {1, 2, 4}
    assert len(costs.full_verify) == 3 and list(costs.full_verify) == sorted(costs.full_verify)
    assert costs.step == costs.full_verify[0]
    assert costs.verify_pass(3, 0) == costs.full_verify[2]
    assert costs.verify_pass(6, 0) == pytest.approx(2 * costs.full_verify[2])  # past the widths measured
    # a draft's sublayers are priced at their form's compiled speed: one graph per form, timed against eager
    assert len(adapter.derived["draft segments"]) == 3 and set(costs.draft_speed) == {"exact", "int8", "int4"}
    assert all(0 < speed < 10 for speed in costs.draft_speed.values())
    overhead = costs._overhead
    assert costs.sublayer("mlp", 2, "int4") == pytest.approx(
        (costs.mlp_lowbit["int4"][2] + overhead) * costs.draft_speed["int4"]
    )
    assert costs.sublayer("attn", 1, "exact") == pytest.approx((costs.attn[1] + overhead) * costs.draft_speed["exact"])
    assert Costs.from_dict(json.loads(json.dumps(costs.to_dict()))) == costs
    # a study stored before these were measured prices everything eager, as it did
    older = {k: v for k, v in costs.to_dict().items() if k not in ("full_verify", "draft_speed")}
    assert Costs.from_dict(older).step == costs.verify[0] and Costs.from_dict(older).draft_speed == {}


def test_leviathan_bound():
    assert leviathan_bound(1.0, 3, 0.0) == pytest.approx(4.0)
    assert leviathan_bound(0.0, 4, 0.5) == pytest.approx(1 / 3)
    assert leviathan_bound(0.5, 1, 0.0) == pytest.approx(1.5)


def test_prompts_split_and_file(tmp_path):
    calibration, held_out = split(BUILTIN)
    assert len(calibration) + len(held_out) == len(BUILTIN) and held_out
    assert {p.category for p in held_out} <= {p.category for p in BUILTIN}
    assert [p.text for p in read_prompts(write_prompts(tmp_path / "p.jsonl"))] == [p.text for p in SHORT]
    (tmp_path / "one.jsonl").write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["hi"]}))
    with pytest.raises(SelfspecError, match="at least 2"):
        read_prompts(tmp_path / "one.jsonl")


def test_tune_writes_a_schedule_that_runs_and_resumes(smollm2_fp32, tmp_path, one_thread):
    model, tokenizer = smollm2_fp32
    out = tmp_path / "smol.schedule.json"
    prompts = write_prompts(tmp_path / "p.jsonl")
    common = ["smollm2-135m", "--dtype", "float32", "--prompts", str(prompts), "--out", str(out), "--threads", "1"]
    result = CliRunner().invoke(tune_command, [*common, "--trials", "3", "--finalists", "2"])
    assert result.exit_code == 0, result.output
    assert "finalists" in result.output and "wrote" in result.output

    schedule = selfspec.Schedule.from_file(out)
    meta = schedule.meta
    assert meta["model"]["name"] == "smollm2-135m" and meta["dtype"] == "float32"
    assert meta["trials"] == 3 and 1 <= len(meta["finalists"]) <= 3
    # the built-in default (the first seed) is timed beside the finalists: the record must beat it, not just plain
    timed = [selfspec.Schedule.from_dict({**f["schedule"], "format": FORMAT}) for f in meta["finalists"]]
    assert builtin_default(30) in timed
    assert meta["plain_tokens_per_second"] > 0 and meta["tuning_seconds"] > 0
    assert all(f["differing_outputs"] == 0 for f in meta["finalists"])  # float32 drafting is exact
    assert schedule.drafting == (meta["speedup"] > 1.0)
    ids = encode_prompt(tokenizer, SHORT[0].text)
    fast = selfspec.wrap(model, schedule)
    assert fast.generate(ids, max_new_tokens=8, do_sample=False).shape == (1, ids.shape[1] + 8)
    # recorded for this model, dtype and machine: wrap given no schedule runs it
    assert "recorded for this model, dtype and machine" in result.output
    default = selfspec.wrap(model)
    assert default.schedule == schedule and "recorded by `selfspec tune smollm2-135m`" in default.schedule_source

    storage = f"sqlite:///{out.with_suffix('.db')}"
    resumed = CliRunner().invoke(tune_command, [*common, "--trials", "2", "--finalists", "0"])
    assert resumed.exit_code == 0, resumed.output
    assert study_trials(storage, f"smollm2-135m-float32-speed-space{space.VERSION}") == 5


def test_two_workers_share_one_study(smollm2_fp32, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    storage, name = f"sqlite:///{tmp_path / 'shared.db'}", "shared"
    store_small_calibration(smollm2_fp32, prompts, storage, name)

    worker = [sys.executable, "-m", "selfspec.search.command", "smollm2-135m", "--dtype", "float32"]
    worker += ["--prompts", str(prompts), "--storage", storage, "--study", name, "--trials", "2", "--finalists", "0"]
    workers = [
        subprocess.Popen(
            [*worker, "--seed", str(seed), "--threads", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in (1, 2)
    ]
    for w in workers:
        output, _ = w.communicate(timeout=240)
        assert w.returncode == 0, output
    # each worker adds exactly its own 2 trials, so 5 means both wrote to the one study
    assert study_trials(storage, name) == 5


def test_ctrl_c_prints_how_to_resume(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "load_model", interrupted)
    out = tmp_path / "m.schedule.json"
    result = CliRunner().invoke(tune_command, ["smollm2-135m", "--out", str(out), "--trials", "7"])
    assert result.exit_code == 130
    assert f"--storage sqlite:///{out.with_suffix('.db')}" in result.output
    assert (
        f"--study smollm2-135m-bfloat16-speed-space{space.VERSION}" in result.output and "--trials 7" in result.output
    )


def test_a_study_refuses_another_objective(tmp_path):
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    open_study(TuneConfig(tmp_path / "x.json", storage, "x"))
    with pytest.raises(SelfspecError, match="objective"):
        open_study(TuneConfig(tmp_path / "x.json", storage, "x", objective="speed+acceptance"))


def test_expected_calibration_error():
    agree = torch.tensor([True, False] * 50)
    assert expected_calibration_error(torch.full((100,), 0.5), agree) == pytest.approx(0.0)
    assert expected_calibration_error(torch.full((100,), 0.95), agree) == pytest.approx(0.45, abs=1e-6)
    sure = torch.tensor([0.9] * 10 + [0.15] * 10)
    right = torch.tensor([True] * 9 + [False] + [False] * 8 + [True] * 2)
    assert expected_calibration_error(sure, right) == pytest.approx(0.5 * 0.0 + 0.5 * 0.05, abs=1e-6)


def test_fitted_anneal_lowers_the_calibration_error(smollm2_fp32, calibrated):
    model, _ = smollm2_fp32
    texts, _ = calibrated
    schedule = selfspec.Schedule(exit_layers=(12, 18), max_draft=3, anneal=0.0, confidence=0.5)
    result = fit_anneal(model, texts, schedule)
    print(f"ECE at a=0: {result.ece_before:.4f}; fitted a={result.anneal:.2f}: {result.ece:.4f}")
    assert result.positions == 2 * sum(len(t.positions) for t in texts)  # both exits pooled
    assert result.ece <= result.ece_before and 0.0 <= result.anneal <= max(GRID)


def test_calibrate_command_writes_the_fitted_schedule(smollm2_fp32, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    source = tmp_path / "s.json"
    selfspec.Schedule(exit_layer=20, max_draft=3, anneal=0.0, confidence=0.6).to_file(source)
    args = ["smollm2-135m", "--schedule", str(source), "--prompts", str(prompts), "--tokens", "8"]
    result = CliRunner().invoke(calibrate_command, [*args, "--dtype", "float32", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "ECE" in result.output and "fitted" in result.output
    fitted = selfspec.Schedule.from_file(tmp_path / "s.calibrated.json")
    calibration = fitted.meta["calibration"]
    assert fitted.anneal == calibration["anneal"] and calibration["ece"] <= calibration["ece_before"]
    assert fitted.exit_layer == 20 and fitted.confidence == 0.6
