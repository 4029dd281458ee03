"""Command-line options that every command which loads a model shares."""

import click

trust_remote_code_option = click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Run modelling code shipped with the model (off by default: only for a model you trust).",
)
