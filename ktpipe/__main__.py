"""`python -m ktpipe <stage> ...`: how `dvc.yaml` runs each stage."""
from ktpipe.cli import main

main(prog_name="ktpipe")
