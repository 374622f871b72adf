"""Stage finetune@<recipe>: fine-tune on the inverted images with the recipe's objective (Eq. 2)."""
import dataclasses
import math
from pathlib import Path

import click

from ktpipe.cli import FAMILY_OPTION, PARAMS_OPTION, UserError, load_params, run_command, run_step


@click.command("finetune")
@PARAMS_OPTION
@FAMILY_OPTION
@click.option("--lr", type=float, default=None, help="Override params `lr` (fine-tuning learning rate).")
@click.argument("recipe")
@click.argument("concepts_dir", default="data/concepts", type=click.Path(file_okay=False))
@click.argument("inverted_dir", default="data/inverted", type=click.Path(file_okay=False))
@click.argument("out_dir", required=False, type=click.Path(file_okay=False))
@click.argument("log_path", required=False, type=click.Path(dir_okay=False))
def command(params_path: str, family: str | None, lr: float | None, recipe: str, concepts_dir: str,
            inverted_dir: str, out_dir: str | None, log_path: str | None) -> None:
    """Fine-tune with RECIPE (a key of params `recipes`) on the images in INVERTED_DIR; save a
    checkpoint folder OUT_DIR (default models/<recipe>) and the training log LOG_PATH (default
    metrics/finetune/<recipe>.json)."""
    from ktpipe.distributed import distribute
    from ktpipe.transfer.finetune import run_finetune

    params = load_params(params_path, family)
    distribute(params)
    if lr is not None:
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"--lr must be a finite positive number, got {lr}")
        params = dataclasses.replace(params, lr=lr)
    out_dir = out_dir or f"models/{recipe}"
    summary = run_step(run_finetune, params, recipe, Path(concepts_dir), Path(inverted_dir), Path(out_dir),
                       Path(log_path or f"metrics/finetune/{recipe}.json"))
    click.echo(f"fine-tuned {recipe!r} on {summary['n_images']} images in {summary['seconds']} s -> {out_dir}")


if __name__ == "__main__":
    run_command(command)
