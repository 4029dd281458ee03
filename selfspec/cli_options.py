"""What the commands share: options of every command that loads a model, and the console tables print to."""

import click
from rich.console import Console

trust_remote_code_option = click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Run modelling code shipped with the model (off by default: only for a model you trust).",
)


def table_console() -> Console:
    """stdout; a log or pipe has no width to fit, and rich's default 80 columns would squeeze the tables."""
    console = Console()
    if not console.is_terminal:
        console.width = 140
    return console
