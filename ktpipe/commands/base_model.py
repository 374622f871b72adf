"""Stage base_model: pretrain the demo model, or record the real model params name."""
from pathlib import Path

import click

from ktpipe.cli import FAMILY_OPTION, PARAMS_OPTION, load_params, run_step


@click.command("base_model")
@PARAMS_OPTION
@FAMILY_OPTION
@click.argument("world_path", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.argument("log_path", type=click.Path(dir_okay=False))
def command(params_path: str, family: str | None, world_path: str, out_dir: str, log_path: str) -> None:
    """Pretrain the demo model on the world of WORLD_PATH into OUT_DIR (loss log: LOG_PATH), or
    record there the real model params `model` names."""
    from ktpipe.base_model import run_base_model

    summary = run_step(run_base_model, load_params(params_path, family), Path(out_dir), Path(log_path),
                       Path(world_path))
    click.echo(f"base model ready in {summary['seconds']} s -> {out_dir}")
