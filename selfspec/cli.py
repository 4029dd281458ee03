"""The `selfspec` command line."""

from __future__ import annotations

import sys
from typing import Any

import click
import torch
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from selfspec.cli_options import ScheduleChoice, schedule_for, schedule_option, trust_remote_code_option
from selfspec.errors import SelfspecError
from selfspec.schedule import Schedule, describe, recorded_here
from selfspec.schedule.recorded import Recorded
from selfspec.wrap import wrap
from selfspec.zoo import list_models, load_model, parse_dtype


def _fail(message: str, code: int = 2) -> None:
    # one line, so scripts and humans both get the reason without a traceback
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """A group that reports user errors as a single `error: ...` line with exit status 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standalone = kwargs.pop("standalone_mode", True)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            _fail(e.format_message())
        except SelfspecError as e:
            _fail(str(e))
        except click.Abort:
            _fail("aborted", 130)
        if not standalone:
            return rv
        # with standalone_mode=False click returns --help/--version's exit code instead of exiting
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group)
@click.version_option(package_name="selfspec", prog_name="selfspec")
def main() -> None:
    """Self-speculative decoding for Hugging Face causal LMs."""


def _human(size: int | None) -> str:
    if size is None:
        return "-"
    if size < 1e6:
        return f"{size / 1e3:.1f} KB"
    return f"{size / 1e6:.0f} MB" if size < 1e9 else f"{size / 1e9:.2f} GB"


@main.command()
@click.option("--verify", is_flag=True, help="Hash every cached file in full (slow) instead of a size/mtime check.")
def models(verify: bool) -> None:
    """List the model zoo and what is cached."""
    recorded = recorded_here()
    table = Table(title="selfspec model zoo")
    for column in ("name", "source", "layers", "cached", "size", "tuned here", "path"):
        table.add_column(column, overflow="fold")
    for info in list_models(verify=verify):
        name = f"{info.name}\n[dim]{info.note}[/dim]" if info.note else info.name
        cached = "[green]yes[/green]" if info.cached else "no"
        tuned = ", ".join(sorted({r.key["dtype"] for r in recorded if r.model == info.name})) or "-"
        table.add_row(name, info.source, str(info.layers), cached, _human(info.size_bytes), tuned, str(info.path))
    console = Console()
    console.print(table)
    if recorded:
        console.print(_recorded_table(recorded))


def _recorded_table(recorded: list[Recorded]) -> Table:
    """The schedules tune recorded on this CPU, which wrap and the commands run when given no --schedule."""
    table = Table(title="schedules `selfspec tune` recorded on this machine (used when no --schedule is given)")
    for column in ("model", "dtype", "threads", "schedule", "× plain", "recorded", "file"):
        table.add_column(column, overflow="fold")
    for r in recorded:
        speedup = r.schedule.meta.get("speedup")
        times = f"{speedup:.3f}" if isinstance(speedup, (int, float)) else "-"
        table.add_row(
            r.model, r.key["dtype"], str(r.key["threads"]), describe(r.schedule), times, r.recorded, str(r.path)
        )
    return table


def _encode(tokenizer: PreTrainedTokenizerBase, prompt: str) -> torch.Tensor:
    """Prompt token ids [1, T], wrapped in the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return encoded["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def _generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    streamer: TextStreamer | None,
    schedule: Schedule | None,
    source: str | None,
) -> torch.Tensor:
    """Greedy generation through the engine; returns prompt + new tokens [1, T + N]. Schedule None: what
    `selfspec tune` recorded for this model and machine, else the built-in default (wrap says which)."""
    return wrap(model, schedule, source=source).generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=streamer,
    )


@main.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option(
    "--dtype",
    default="bfloat16",
    show_default=True,
    help="float32, bfloat16 or float16 (also fp32, bf16, fp16).",
)
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@schedule_option("Draft schedule.")
@trust_remote_code_option
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads (default: torch's choice).")
def generate(
    model: str,
    prompt: str,
    max_new_tokens: int,
    dtype: str,
    stream: bool,
    schedule_choice: ScheduleChoice | None,
    threads: int | None,
    trust_remote_code: bool,
) -> None:
    """Generate a reply to PROMPT with MODEL (a zoo name, a model directory or a hub id)."""
    parse_dtype(dtype)  # fail before a possibly long model load
    if threads is not None:
        torch.set_num_threads(threads)
    lm, tokenizer = load_model(model, dtype, trust_remote_code=trust_remote_code)
    schedule, source = schedule_for(schedule_choice, lm)
    input_ids = _encode(tokenizer, prompt)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.inference_mode():
        output = _generate(lm, input_ids, max_new_tokens, streamer, schedule, source)
    if not stream:  # the streamer has already printed everything, newline included
        click.echo(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip())


def _register_commands() -> None:
    from .evals.bench import bench_command
    from .evals.command import eval_command
    from .search.command import calibrate_command, tune_command

    main.add_command(tune_command)
    main.add_command(calibrate_command)
    main.add_command(eval_command)
    main.add_command(bench_command)


_register_commands()
