"""`selfspec eval`: speed and losslessness of selfspec against transformers' own decoders."""

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import click
import torch
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from selfspec.cli_options import ScheduleChoice, schedule_for, schedule_option, table_console, trust_remote_code_option
from selfspec.files import ensure_writable
from selfspec.progress import Bars, Lines, progress_for
from selfspec.zoo import load_model, parse_dtype

from . import report as rep
from .longform import longform_prompts
from .prompts import Prompt, load_prompts, select
from .runner import BASELINES, Method, PromptRun, Settings, build_methods, check_baselines, run_eval

INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [item.strip() for item in value.split(",") if item.strip()]


def prompts_from(path: Path | None, categories: str | None, limit: int | None) -> list[Prompt]:
    prompts = longform_prompts() if path is None else load_prompts(path)
    return select(prompts, _csv(categories), limit)


def timed_run_options(command: Callable) -> Callable:
    """The options of every command that times generations over a prompt set (eval, bench)."""
    options = [
        click.option(
            "--prompts",
            "prompts_path",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Spec-Bench JSONL (default: the built-in long-form set).",
        ),
        click.option("--categories", help="Comma-separated categories to keep (default: all)."),
        click.option("--limit", type=int, help="At most N (>= 1) prompts from each category."),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True),
        click.option("--dtype", default="bfloat16", show_default=True, help="float32, bfloat16 or float16."),
        click.option(
            "--repeats",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Timed runs per prompt and method; tokens/s is their median.",
        ),
        trust_remote_code_option,
        click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads (default: torch's choice)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def progress_console() -> Console:
    """Progress goes to stderr, so stdout keeps only the tables: bars on a terminal, plain lines in a log."""
    return Console(stderr=True)


def run_with_progress(
    methods: Sequence[Method],
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    settings: Settings,
    device: torch.device,
    progress: Bars | Lines,
) -> tuple[list[PromptRun], bool]:
    """The finished prompts, and whether Ctrl-C cut the run short."""
    done: list[PromptRun] = []
    progress.phase("generations", len(prompts) * len(methods), "runs", note="warming up")
    finished = itertools.count(1)

    def step(prompt: Prompt, method: str) -> None:
        progress.advance(next(finished), f"prompt {len(done) + 1}/{len(prompts)} · {method}")

    try:
        for run in run_eval(methods, tokenizer, prompts, settings, device, step):
            done.append(run)
    except KeyboardInterrupt:
        return done, True
    return done, False


def _compare(model: str | None, paths: tuple[Path, Path]) -> None:
    if model is not None:
        raise click.UsageError("--compare reads two saved reports: give no MODEL")
    reports = [rep.load_report(path) for path in paths]
    rep.print_comparison(*reports, [str(path) for path in paths], table_console())


@click.command("eval")
@click.argument("model", required=False)
@schedule_option("The schedule under test.")
@timed_run_options
@click.option(
    "--baselines",
    default=",".join(BASELINES),
    show_default=True,
    help="Methods to compare with; generate always runs, as the reference.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Report folder (default: ./eval-<model>).",
)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--seed", type=int, help="Seed for --sample (default 0), reset before every generation.")
@click.option(
    "--compare",
    nargs=2,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Print two report.json files side by side and exit.",
)
@click.pass_context
def eval_command(
    ctx: click.Context,
    model: str | None,
    schedule_choice: ScheduleChoice | None,
    prompts_path: Path | None,
    categories: str | None,
    limit: int | None,
    max_new_tokens: int,
    dtype: str,
    baselines: str,
    repeats: int,
    out_dir: Path | None,
    threads: int | None,
    trust_remote_code: bool,
    sample: bool,
    seed: int | None,
    compare: tuple[Path, Path] | None,
) -> None:
    """Measure MODEL's speed-up from selfspec and check its output against model.generate.

    MODEL is a zoo name or a model directory. Writes report.json and report.png to --out;
    `selfspec eval --compare A.json B.json` (no MODEL) prints two reports side by side.
    """
    if compare:
        _compare(model, compare)
        return
    if model is None:
        raise click.UsageError("missing MODEL (a zoo name or a model directory)")
    if seed is not None and not sample:
        raise click.UsageError("--seed applies to --sample only")
    # everything that can be wrong with the arguments fails here, before a possibly long model load
    parse_dtype(dtype)
    chosen = _csv(baselines) or []
    check_baselines(chosen)
    prompts = prompts_from(prompts_path, categories, limit)
    out_dir = out_dir or Path(f"eval-{Path(model).name}")
    ensure_writable(out_dir / "report.json")
    if threads is not None:
        torch.set_num_threads(threads)

    with progress_for(progress_console(), "eval", transient=True) as progress:
        progress.stage(f"loading {model} ({dtype})")
        lm, tokenizer = load_model(model, dtype, trust_remote_code=trust_remote_code)
        schedule, schedule_source = schedule_for(schedule_choice, lm)
        methods = build_methods(lm, schedule, chosen, schedule_source)
        settings = Settings(max_new_tokens, repeats, sample, 0 if seed is None else seed)
        source = str(prompts_path) if prompts_path else "built-in long-form"
        categories_run = list(dict.fromkeys(p.category for p in prompts))
        meta = rep.run_meta(model, lm, methods, settings, prompts=source, categories=categories_run, limit=limit)
        runs, interrupted = run_with_progress(methods, tokenizer, prompts, settings, lm.device, progress)
    report = rep.build_report([rep.prompt_record(run) for run in runs], meta, partial=interrupted)
    console = table_console()
    rep.print_report(report, console)
    for path in rep.save(report, out_dir):
        console.print(f"wrote {path}")
    if interrupted:
        console.print(f"[yellow]interrupted: the report holds the {len(runs)} finished prompt(s)[/yellow]")
        ctx.exit(INTERRUPTED)
