"""`selfspec tune MODEL`: find the draft schedule that decodes fastest on this machine, and write it."""

import shlex
import time
from dataclasses import replace
from pathlib import Path

import click
import optuna
import torch
from rich.table import Table

from selfspec.cli_options import table_console, trust_remote_code_option
from selfspec.drafts.lowbit import kernels_line
from selfspec.errors import SelfspecError
from selfspec.files import ensure_writable
from selfspec.progress import Bars, Lines, progress_for
from selfspec.schedule import Schedule, describe
from selfspec.wrap import wrap
from selfspec.zoo import load_model, parse_dtype

from . import space
from .anneal import fit_anneal
from .prompts import BUILTIN, read_prompts, split
from .surrogate import prepare
from .teacher import greedy_continuations
from .tune import (
    OBJECTIVES,
    Measurement,
    Reporter,
    TuneConfig,
    TuneResult,
    default_storage,
    open_storage,
    speedup,
    tune,
)


class _Progress(Reporter):
    """tune's progress on bars or lines: trials with the best predicted speedup, then timed runs with the best
    measured one."""

    def __init__(self, display: Bars | Lines):
        self.display = display
        self.trials_done = 0  # by this run, for the resume hint after Ctrl-C

    def stage(self, text: str) -> None:
        self.display.stage(text)

    def search(self, trials: int, timeout: float | None) -> None:
        self.display.phase("search", trials, "trials", timeout)

    def trial(self, done: int, best_predicted: float | None) -> None:
        self.trials_done = done
        self.display.advance(done, f"best predicted {_times(best_predicted)}")

    def measure(self, runs: int, seconds: float) -> None:
        self.display.phase("measure", runs, "runs", seconds)

    def measured(self, done: int, best_speedup: float | None) -> None:
        self.display.advance(done, f"best measured {_times(best_speedup)}")


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


_CAPTION = (
    "alpha: layer-draft/full agreement; c: layer-draft step / full step; MB/tok: weight bytes a layer-draft "
    "token reads; copied: predicted share of tokens from "
    "context copies; bound: Leviathan's (1-a^(g+1))/((1-a)(gc+1)); "
    "pred./meas.: predicted / measured speedup; acc.: measured tokens per verify pass; "
    "schedule: context copies (ctx n-gram sizes, width), skipped attn/mlp layers, int8/int4 sublayers, draft head "
    "(precision, tokens), exit, width (+: adaptive), "
    "confidence floor p, anneal a"
)


def _table(result: TuneResult) -> Table:
    table = Table(title="finalists timed against the plain loop on held-out prompts", caption=_CAPTION)
    for column in ("trial", "schedule", "alpha", "c", "MB/tok", "copied", "bound", "pred.", "meas.", "acc.", "tok/s"):
        table.add_column(column, overflow="fold", justify="left" if column == "schedule" else "right")
    plain = result.plain
    table.add_row(
        "-",
        describe(plain.schedule),
        "",
        "",
        "",
        "",
        "",
        "1.000",
        "1.000",
        "1.00",
        f"{plain.stats.tokens_per_second:.2f}",
    )
    for run in result.finalists:
        table.add_row(*_row(run, plain), style="bold green" if run is result.chosen else None)
    return table


def _row(run: Measurement, plain: Measurement) -> tuple[str, ...]:
    p = run.prediction
    return (
        str(run.trial.number),
        describe(run.schedule) + (" [red](output differs)[/red]" if run.differing_outputs else ""),
        f"{p['agreement']:.2f}",
        f"{p['draft_cost']:.2f}",
        f"{p.get('draft_bytes', 0.0) / 1e6:.0f}" if p.get("draft_bytes") else "",
        f"{p.get('context_share', 0.0):.0%}",
        f"{p['bound']:.3f}",
        f"{p['speedup']:.3f}",
        f"{speedup(run, plain):.3f}",
        f"{run.stats.mean_accepted_length:.2f}",
        f"{run.stats.tokens_per_second:.2f}",
    )


def _summary(result: TuneResult, out: Path) -> str:
    plain_tps = result.plain.stats.tokens_per_second
    if result.chosen is None:
        best = max((speedup(r, result.plain) for r in result.finalists), default=None)
        return (
            f"no finalist beat the plain loop (best {_times(best)} at {plain_tps:.2f} tok/s plain): "
            f"wrote drafting off to {out}"
        )
    chosen = result.chosen
    return (
        f"chosen: {describe(chosen.schedule)}: {speedup(chosen, result.plain):.3f}x the plain loop "
        f"({chosen.stats.tokens_per_second:.2f} vs {plain_tps:.2f} tok/s, "
        f"{chosen.stats.mean_accepted_length:.2f} tokens per pass); wrote {out}"
    )


@click.command("tune")
@click.argument("model")
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Calibration prompts, Spec-Bench JSONL (question_id, category, turns); default: built-in set.",
)
@click.option(
    "--trials",
    type=click.IntRange(min=0),
    default=TuneConfig.trials,
    show_default=True,
    help="Trials this run adds to the study (0: only measure the study's best).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=TuneConfig.timeout,
    show_default=True,
    help="Seconds for this run's search; finished trials are kept either way.",
)
@click.option("--dtype", default="bfloat16", show_default=True, help="float32, bfloat16 or float16.")
@click.option(
    "--objective",
    type=click.Choice(OBJECTIVES),
    default="speed",
    show_default=True,
    help="Predicted speedup alone, or with the accepted length as a second objective.",
)
@click.option("--storage", help="Optuna RDB URL shared by workers; default: sqlite file next to --out.")
@click.option("--study", "study_name", help="Study name; default: MODEL-DTYPE-OBJECTIVE-spaceN.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Default: ./MODEL.schedule.json.")
@click.option(
    "--seed", type=int, default=TuneConfig.seed, show_default=True, help="Sampler seed; give each worker its own."
)
@trust_remote_code_option
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads (default: torch's choice).")
@click.option(
    "--finalists",
    type=click.IntRange(0, 10),
    default=TuneConfig.finalists,
    show_default=True,
    help="Best predicted schedules to time for real; 0: search only, for extra workers.",
)
def tune_command(
    model: str,
    prompts_file: Path | None,
    trials: int,
    timeout: float,
    dtype: str,
    objective: str,
    storage: str | None,
    study_name: str | None,
    out: Path | None,
    seed: int,
    threads: int | None,
    trust_remote_code: bool,
    finalists: int,
) -> None:
    """Tune MODEL's draft schedule (a zoo name or a model directory) and write it as JSON.

    A surrogate (teacher-forced draft agreement and measured layer costs) ranks schedules in an Optuna
    study; the best --finalists are then timed against the plain loop on held-out prompts, and the fastest
    measured one is written, or drafting off if none beats the plain loop. The study stays in --storage:
    rerun to add trials, or start more workers with the same --storage and --study.
    """
    started = time.perf_counter()
    dtype_name = str(parse_dtype(dtype)).removeprefix("torch.")  # fail before a long load; bf16 == bfloat16
    label = Path(model).name
    out = out or Path(f"{label}.schedule.json")
    ensure_writable(out)
    config = TuneConfig(
        out=out,
        storage=storage or default_storage(out),
        study=study_name or f"{label}-{dtype_name}-{objective}-space{space.VERSION}",
        trials=trials,
        timeout=timeout,
        objective=objective,
        seed=seed,
        finalists=finalists,
    )
    calibration, held_out = split(read_prompts(prompts_file) if prompts_file else BUILTIN)
    open_storage(config.storage)  # a missing driver or an unreachable server fails here, before a long load
    if threads is not None:
        torch.set_num_threads(threads)
    # A failing trial's error reaches the command anyway; Optuna's warning would repeat it with a traceback, on
    # Ctrl-C too.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    console = table_console()
    progress = _Progress(progress_for(console, "tune"))
    try:
        with progress.display:
            progress.stage(f"loading {model} ({dtype_name})")
            lm, tokenizer = load_model(model, dtype_name, trust_remote_code=trust_remote_code)
            result = tune(lm, tokenizer, label, calibration, held_out, config, progress)
    except KeyboardInterrupt:
        console.print(f"\ninterrupted: finished trials are kept in {config.storage} (study {config.study!r})")
        resume = ["selfspec", "tune", model, "--dtype", dtype_name, "--objective", objective]
        resume += ["--prompts", str(prompts_file)] if prompts_file else []
        resume += ["--storage", config.storage, "--study", config.study, "--out", str(out)]
        resume += ["--trials", str(max(0, trials - progress.trials_done)), "--finalists", str(finalists)]
        console.print(f"resume with: {shlex.join(resume)}", soft_wrap=True)
        click.get_current_context().exit(130)
    seconds = time.perf_counter() - started
    if result.plain is None:
        console.print(
            f"added trials to study {config.study!r} in {config.storage}: {result.trials} finished, "
            f"{result.pruned} pruned ({seconds:.0f}s); measure with --trials 0"
        )
        return
    console.print(f"study: {result.trials} schedules scored, {result.pruned} more pruned on their early figure")
    console.print(_table(result))
    for scheme, kernels in result.schedule.meta.get("kernels", {}).items():
        console.print(kernels_line(scheme, kernels), soft_wrap=True)
    console.print(_summary(result, out) + f" ({seconds:.0f}s)")
    console.print(
        f"recorded for this model, dtype and machine in {result.recorded}: `selfspec generate`, `eval` and `bench` "
        "without --schedule, and wrap(model) given none, run it here",
        soft_wrap=True,
    )


@click.command("calibrate")
@click.argument("model")
@click.option(
    "--schedule",
    "schedule_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Schedule JSON whose layer draft is calibrated.",
)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Calibration prompts, Spec-Bench JSONL; default: built-in set.",
)
@click.option("--tokens", type=click.IntRange(min=4), default=48, show_default=True, help="Greedy tokens a prompt.")
@click.option("--dtype", default="bfloat16", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Default: SCHEDULE.calibrated.json.")
@trust_remote_code_option
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads (default: torch's choice).")
def calibrate_command(
    model: str,
    schedule_path: Path,
    prompts_file: Path | None,
    tokens: int,
    dtype: str,
    out: Path | None,
    threads: int | None,
    trust_remote_code: bool,
) -> None:
    """Fit the annealing strength a of a schedule's layer draft on MODEL, and write the schedule with it.

    a is chosen to minimise the expected calibration error (ECE) of the draft's annealed confidence
    against agreement with the full model, on the model's own greedy continuations of the prompts.
    """
    schedule = Schedule.from_file(schedule_path)
    if schedule.max_draft == 0:
        raise SelfspecError(f"{schedule_path} has no layer draft (max_draft 0): nothing to calibrate")
    prompts = read_prompts(prompts_file) if prompts_file else BUILTIN
    dtype_name = str(parse_dtype(dtype)).removeprefix("torch.")
    out = out or schedule_path.with_name(f"{schedule_path.stem}.calibrated.json")
    ensure_writable(out)
    if threads is not None:
        torch.set_num_threads(threads)
    console = table_console()
    with console.status(f"loading {model} ({dtype_name})") as status:
        lm, tokenizer = load_model(model, dtype_name, trust_remote_code=trust_remote_code)
        wrap(lm, schedule)  # refuses a schedule made for another model
        status.update(f"greedy continuations of {len(prompts)} prompts")
        texts = prepare(lm, greedy_continuations(lm, tokenizer, [p.text for p in prompts], tokens))
        status.update("fitting the annealing strength")
        result = fit_anneal(lm, texts, schedule)
    table = Table(title=f"draft confidence calibration · {describe(schedule)} · {result.positions} positions")
    for column in ("", "a", "ECE"):
        table.add_column(column, justify="right")
    table.add_row("schedule", f"{result.anneal_before:.2f}", f"{result.ece_before:.4f}")
    table.add_row("fitted", f"{result.anneal:.2f}", f"{result.ece:.4f}", style="bold green")
    console.print(table)
    replace(schedule, anneal=result.anneal).with_meta(calibration=result.to_dict()).to_file(out)
    console.print(f"wrote {out}")


if __name__ == "__main__":  # `python -m selfspec.search.command`: one more worker on a shared study
    tune_command()
