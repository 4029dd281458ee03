"""What the commands share: options of every command that loads a model, and the console tables print to."""

from dataclasses import dataclass
from typing import Any

import click
from rich.console import Console
from transformers import PreTrainedModel

from .errors import ScheduleError
from .schedule import NAMED, Schedule

trust_remote_code_option = click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Run modelling code shipped with the model (off by default: only for a model you trust).",
)


@dataclass(frozen=True)
class ScheduleChoice:
    """--schedule's value: a named schedule, or a schedule file read (and checked) before the model loads."""

    name: str | None = None
    schedule: Schedule | None = None
    path: str | None = None

    @property
    def source(self) -> str:
        return f"named {self.name!r}" if self.name else f"from {self.path}"

    def for_model(self, model: PreTrainedModel) -> Schedule:
        return NAMED[self.name](model.config.num_hidden_layers) if self.name else self.schedule


class ScheduleParam(click.ParamType):
    name = "FILE|NAME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> ScheduleChoice:
        if isinstance(value, ScheduleChoice):
            return value
        if value in NAMED:
            return ScheduleChoice(name=value)
        try:
            return ScheduleChoice(schedule=Schedule.from_file(value), path=value)
        except ScheduleError as e:
            self.fail(f"{e} (--schedule takes a schedule file or one of: {', '.join(NAMED)})", param, ctx)


def schedule_option(help_text: str):  # noqa: ANN201 - a click decorator
    return click.option(
        "--schedule",
        "schedule_choice",
        type=ScheduleParam(),
        help=f"{help_text} A schedule JSON file, or {', '.join(NAMED)} (drafting off; the built-in default; the "
        "fixed layer-exit recipe). Default: what `selfspec tune` recorded for this model and machine, else the "
        "built-in default.",
    )


def schedule_for(choice: ScheduleChoice | None, model: PreTrainedModel) -> tuple[Schedule | None, str | None]:
    """The schedule --schedule asked for and where it came from, for `wrap(model, schedule, source=...)`, which says
    both on stderr; (None, None) leaves the choice to wrap (recorded here, else built-in)."""
    return (None, None) if choice is None else (choice.for_model(model), choice.source)


def table_console() -> Console:
    """stdout; a log or pipe has no width to fit, and rich's default 80 columns would squeeze the tables."""
    console = Console()
    if not console.is_terminal:
        console.width = 140
    return console
