"""Stage base_model (and base_model_family@<family>): the model before transfer. A demo backend's
is the shipped pretrained model (or pretrained anew when params or code differ from its record);
a real model's is a record of what params `model` names."""
from pathlib import Path

import click

from ktpipe.cli import FAMILY_OPTION, PARAMS_OPTION, load_params, run_command, run_step


@click.command("base_model")
@PARAMS_OPTION
@FAMILY_OPTION
@click.argument("world_path", default="data/known.json", type=click.Path(dir_okay=False))
@click.argument("out_dir", required=False, type=click.Path(file_okay=False))
@click.argument("log_path", required=False, type=click.Path(dir_okay=False))
def command(params_path: str, family: str | None, world_path: str, out_dir: str | None, log_path: str | None) -> None:
    """Make the base model from the known concepts of WORLD_PATH into OUT_DIR (default models/baseline,
    or models/<family>/baseline), its pretraining log LOG_PATH (default metrics/base_model.json, or
    metrics/<family>/base_model.json)."""
    from ktpipe.base_model import run_base_model

    prefix = f"{family}/" if family else ""
    out_dir = out_dir or f"models/{prefix}baseline"
    log_path = log_path or f"metrics/{prefix}base_model.json"
    summary = run_step(run_base_model, load_params(params_path, family), Path(out_dir), Path(log_path),
                       Path(world_path))
    click.echo(f"base model ready in {summary['seconds']} s -> {out_dir}")


if __name__ == "__main__":
    run_command(command)
