"""`python -m stages <command> ...`: the `ktpipe` console script without installing it."""
from ktpipe.cli import run_command
from stages.cli import main

run_command(main)
