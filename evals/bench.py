"""`selfspec bench`: how fast the decode loop itself runs, against `model.generate` and the hardware floor.

Where `selfspec eval` asks what speculation gains per category, the bench isolates the loop: the same
prompts through `model.generate`, the engine with drafting off over the model's own modules
(backend="reference") and over its fused forward, and, given a schedule, the engine speculating. Each is
reported as tokens/s, milliseconds per token, speed-up over generate and distance from the floor
(`evals/floor.py`). `--profile` adds where the time of one draft step and one verify pass goes, op by op.
"""

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import selfspec
from selfspec import Schedule, SelfspecError
from selfspec.cli_options import ScheduleChoice, schedule_for, schedule_option, table_console
from selfspec.cpu import cpu_flags, cpu_name, kernel_setting
from selfspec.decode.loop import DRAFT, VERIFY
from selfspec.drafts.lowbit import draft_weights, kernels_line
from selfspec.engine.compiled import decode_step, step_line
from selfspec.engine.fused import FusedAdapter, engine_adapter, path_line
from selfspec.files import ensure_writable
from selfspec.progress import progress_for
from selfspec.schedule import describe
from selfspec.wrap import step_mode
from selfspec.zoo import load_model, parse_dtype

from . import passes
from .command import progress_console, prompts_from, run_with_progress, timed_run_options
from .floor import draft_weight_bytes, floor_seconds_per_token, read_bandwidth, step_weight_bytes
from .prompts import encode
from .report import layer_draft_figures, total_stats
from .runner import REFERENCE, Method, PromptRun, Settings

PROFILED_TOKENS = 32  # the profiler's own bookkeeping grows with the ops it records; 32 tokens show the pattern
PROFILE_ROWS = 12


def bench_methods(
    model: PreTrainedModel, schedule: Schedule | None, source: str | None = None
) -> tuple[list[Method], Schedule]:
    """generate, the plain loop per backend this model has, and speculation where the schedule drafts (None: what
    tune recorded here, else the built-in default); and the schedule."""
    methods = [Method(REFERENCE, model.generate)]
    backends = ["reference", "eager", "compiled"] if isinstance(engine_adapter(model), FusedAdapter) else ["reference"]
    for backend in backends:
        plain = selfspec.wrap(model, Schedule.plain(), backend=backend)
        methods.append(Method(f"plain·{backend}", plain.generate, plain))
    fast = selfspec.wrap(model, schedule, source=source)
    if fast.schedule.drafting:
        methods.append(Method("speculation", fast.generate, fast))
    return methods, fast.schedule


@dataclass
class MethodTotal:
    name: str
    tokens: int = 0
    seconds: float = 0.0
    identical: int = 0  # prompts whose tokens equal generate's
    prompts: int = 0

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.seconds / self.tokens

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def totals(runs: Sequence[PromptRun]) -> list[MethodTotal]:
    """Per method over all prompts: tokens / total seconds, so long replies weigh by their length."""
    names = list(runs[0].runs)
    result = {name: MethodTotal(name) for name in names}
    for run in runs:
        reference = run.runs[REFERENCE].tokens
        for name, method_run in run.runs.items():
            total = result[name]
            total.tokens += len(method_run.tokens)
            total.seconds += len(method_run.tokens) / method_run.tokens_per_second
            total.identical += method_run.tokens == reference
            total.prompts += 1
    return list(result.values())


def print_bench(
    rows: list[MethodTotal], floor_ms: float, weight_mb: float, bandwidth_gbs: float, console: Console
) -> None:
    reference = next(r for r in rows if r.name == REFERENCE)
    table = Table(title=f"decode speed, {rows[0].prompts} prompts")
    for column in ("method", "tokens/s", "ms/token", "× generate", "× floor time", "same tokens as generate"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(
            row.name,
            f"{row.tokens_per_second:.1f}",
            f"{row.ms_per_token:.1f}",
            f"{reference.ms_per_token / row.ms_per_token:.2f}",
            f"{row.ms_per_token / floor_ms:.2f}",
            f"{row.identical}/{row.prompts}",
        )
    table.add_row("floor", f"{1000 / floor_ms:.1f}", f"{floor_ms:.1f}", "", "1.00", "")
    console.print(table)
    console.print(
        f"floor = {weight_mb:.0f} MB of weights read per step / {bandwidth_gbs:.1f} GB/s measured read bandwidth"
    )


def plain_loop_of(model: PreTrainedModel) -> str:
    """The bench method that is the plain loop speculation runs on: its one-token step as wrap chose it."""
    adapter = engine_adapter(model)
    if not isinstance(adapter, FusedAdapter):
        return "plain·reference"
    compiled = decode_step(adapter, step_mode("auto"))
    return "plain·compiled" if compiled is not None and compiled.bucket(1) else "plain·eager"


def draft_figures(runs: Sequence[PromptRun], gamma: int, plain_loop: str) -> dict[str, float]:
    """Speculation's layer draft measured live against the plain loop it runs on: alpha, c and Leviathan's bound."""
    if "speculation" not in runs[0].runs or not gamma:
        return {}
    draft, plain = (total_stats([run.runs[name].stats for run in runs]) for name in ("speculation", plain_loop))
    return layer_draft_figures(draft, plain, gamma)


def print_draft(figures: dict[str, float], gamma: int, plain_loop: str, console) -> None:
    if not figures:
        return
    measured = figures["decode_speedup"]
    console.print(
        f"layer draft, measured: alpha {figures['layer_alpha']:.2f}, c {figures['layer_c']:.2f}, "
        f"Leviathan bound {figures['layer_bound']:.3f} (gamma {gamma}); speculation × {plain_loop} decoding "
        f"{measured:.3f} (prompt passes excluded) = {measured / figures['layer_bound']:.0%} of the bound"
    )


def print_kernels(model: PreTrainedModel, schedule: Schedule, console: Console) -> None:
    """Which kernels ran the schedule's low-bit draft weights, as measured when they were built."""
    adapter = engine_adapter(model)
    for scheme in sorted(schedule.lowbit_schemes if isinstance(adapter, FusedAdapter) else ()):
        console.print(kernels_line(scheme, draft_weights(adapter, scheme).kernels), soft_wrap=True)


def profile_phases(
    method: Method, input_ids: torch.Tensor, tokens: int = PROFILED_TOKENS
) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Self CPU time (µs) of each op inside the loop's draft and verify ranges over one generation, and how
    many times each range ran: {phase: {op: µs}}, {phase: calls}."""
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.inference_mode():
        method.generate(input_ids, max_new_tokens=tokens, do_sample=False)
    by_phase: dict[str, dict[str, float]] = {DRAFT: defaultdict(float), VERIFY: defaultdict(float)}
    calls = dict.fromkeys(by_phase, 0)
    for event in prof.events():
        if event.name in calls:
            calls[event.name] += 1
            continue
        phase = _phase(event)
        if phase is not None:
            by_phase[phase][event.name] += event.self_cpu_time_total
    return by_phase, calls


def _phase(event) -> str | None:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in (DRAFT, VERIFY):
            return parent.name
        parent = parent.cpu_parent
    return None


def print_profile(name: str, by_phase: dict[str, dict[str, float]], calls: dict[str, int], console: Console) -> None:
    for phase, ops in by_phase.items():
        spent = sum(ops.values())
        if not calls[phase] or not spent:
            continue
        table = Table(title=f"{name}: {phase}, {spent / calls[phase] / 1000:.2f} ms per call ({calls[phase]} calls)")
        for column in ("op", "µs per call", "share"):
            table.add_column(column, justify="left" if column == "op" else "right")
        for op, micros in sorted(ops.items(), key=lambda item: -item[1])[:PROFILE_ROWS]:
            table.add_row(op, f"{micros / calls[phase]:.0f}", f"{micros / spent:.0%}")
        console.print(table)


def _print_kernel_lines(model: PreTrainedModel, console: Console) -> None:
    """Which forward ran, the few-row kernel's timing against oneDNN, and the CPU, its kernels and the thread count."""
    adapter = engine_adapter(model)
    console.print(path_line(adapter), soft_wrap=True)
    if isinstance(adapter, FusedAdapter) and adapter.few_rows_line:
        console.print(adapter.few_rows_line, soft_wrap=True)
    console.print(f"cpu: {cpu_name()}; {kernel_setting()}; {torch.get_num_threads()} threads, {model.dtype}")


def bench_passes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    schedule: Schedule | None,
    source: str | None,
    prompts: list,
    bandwidth: float,
) -> tuple[Table, dict]:
    """--passes: every verify width's full-depth pass, and the layer draft's step where the schedule has one."""
    if not isinstance(engine_adapter(model), FusedAdapter):
        raise SelfspecError(f"--passes times the fused forward; {path_line(engine_adapter(model))}")
    peak = passes.peak_flops(model.dtype)
    costs = passes.pass_costs(model, bandwidth, peak, compiled=step_mode("auto") != "eager")
    fast = selfspec.wrap(model, schedule, source=source)
    draft_ms = draft_floor = None
    if fast.schedule.max_draft > 0:
        input_ids = encode(tokenizer, prompts[0].text).to(model.device)
        draft_ms = passes.draft_step(fast, input_ids, PROFILED_TOKENS)
        draft_floor = 1e3 * draft_weight_bytes(model, fast.schedule) / bandwidth
    return passes.passes_table(costs, draft_ms, draft_floor), passes.passes_json(
        costs, draft_ms, model, fast, bandwidth, peak
    )


@click.command("bench")
@click.argument("model")
@schedule_option("Also time speculation with this schedule, where it drafts.")
@timed_run_options
@click.option(
    "--profile",
    "with_profile",
    is_flag=True,
    help="Also profile one generation per engine method: time per op in draft steps and verify passes.",
)
@click.option(
    "--passes",
    "with_passes",
    is_flag=True,
    help="Instead: a full-depth pass at each verify width and the schedule's layer-draft step, against the "
    "one-token step and the floor.",
)
@click.option(
    "--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the figures as JSON."
)
def bench_command(
    model: str,
    schedule_choice: ScheduleChoice | None,
    dtype: str,
    max_new_tokens: int,
    repeats: int,
    threads: int | None,
    prompts_path: Path | None,
    categories: str | None,
    limit: int | None,
    with_profile: bool,
    with_passes: bool,
    out_path: Path | None,
    trust_remote_code: bool,
) -> None:
    """Time MODEL's decode loop against model.generate and the memory-bandwidth floor (greedy decoding)."""
    parse_dtype(dtype)  # everything that can be wrong with the arguments fails before the model loads
    prompts = prompts_from(prompts_path, categories, limit)
    if out_path is not None:
        ensure_writable(out_path)
    if threads is not None:
        torch.set_num_threads(threads)
    console = table_console()
    with progress_for(progress_console(), "bench", transient=True) as progress:
        progress.stage(f"loading {model} ({dtype})")
        lm, tokenizer = load_model(model, dtype, trust_remote_code=trust_remote_code)
        progress.stage("measuring read bandwidth")
        bandwidth = read_bandwidth()
        if with_passes:
            progress.stage("timing full-depth passes by width")
            table, figures = bench_passes(lm, tokenizer, *schedule_for(schedule_choice, lm), prompts, bandwidth)
        else:
            methods, schedule = bench_methods(lm, *schedule_for(schedule_choice, lm))
            settings = Settings(max_new_tokens, repeats)
            runs, interrupted = run_with_progress(methods, tokenizer, prompts, settings, lm.device, progress)
    if with_passes:
        console.print(table)
        _print_kernel_lines(lm, console)
        if out_path is not None:
            out_path.write_text(json.dumps(figures, indent=2) + "\n")
            console.print(f"wrote {out_path}")
        return
    if not runs:
        raise SelfspecError("interrupted before the first prompt finished: nothing to report")
    floor_ms = 1000 * floor_seconds_per_token(lm, bandwidth)
    rows = totals(runs)
    print_bench(rows, floor_ms, step_weight_bytes(lm) / 1e6, bandwidth / 1e9, console)
    gamma = schedule.max_draft
    plain_loop = plain_loop_of(lm)
    draft = draft_figures(runs, gamma, plain_loop)
    print_draft(draft, gamma, plain_loop, console)
    if isinstance(engine_adapter(lm), FusedAdapter):
        console.print(step_line(engine_adapter(lm)), soft_wrap=True)
    print_kernels(lm, schedule, console)
    _print_kernel_lines(lm, console)
    if with_profile:
        input_ids = encode(tokenizer, prompts[0].text).to(lm.device)
        tokens = min(PROFILED_TOKENS, max_new_tokens)
        profiled = [method for method in methods if method.engine is not None]
        with progress_for(progress_console(), "bench", transient=True) as progress:
            progress.phase("profile", len(profiled), "methods")
            profiles = []
            for method in profiled:
                profiles.append(profile_phases(method, input_ids, tokens))
                progress.advance(len(profiles), method.name)
        for method, (by_phase, calls) in zip(profiled, profiles):
            print_profile(method.name, by_phase, calls, console)
    if out_path is not None:
        figures = {
            "model": model, "dtype": dtype, "threads": torch.get_num_threads(), "cpu_flags": cpu_flags(), "kernels": kernel_setting(),
            "engine": path_line(engine_adapter(lm)), "few_row_kernel": getattr(engine_adapter(lm), "few_rows_line", ""), "prompts": len(runs), "schedule": describe(schedule), "layer_draft": draft,
            "max_new_tokens": max_new_tokens, "read_bandwidth_gbs": bandwidth / 1e9, "floor_ms_per_token": floor_ms,
            "methods": [{**asdict(r), "ms_per_token": r.ms_per_token, "tokens_per_second": r.tokens_per_second}
                        for r in rows],
        }  # fmt: skip
        out_path.write_text(json.dumps(figures, indent=2) + "\n")
        console.print(f"wrote {out_path}")
    if interrupted:
        raise SelfspecError(f"interrupted: the table holds the {len(runs)} finished prompt(s)")
