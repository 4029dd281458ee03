"""`python -m selfspec` runs the command line."""

from selfspec.cli import main

main(prog_name="selfspec")
