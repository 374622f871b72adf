"""Stage finetune_family@<family>: fine-tune every recipe of one model family (params `families`)."""
from pathlib import Path

import click

from ktpipe.cli import PARAMS_OPTION, load_params, run_step


@click.command("finetune_family")
@PARAMS_OPTION
@click.argument("family")
@click.argument("concepts_dir", type=click.Path(file_okay=False))
@click.argument("inverted_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.argument("log_dir", type=click.Path(file_okay=False))
def command(params_path: str, family: str, concepts_dir: str, inverted_dir: str, out_dir: str, log_dir: str) -> None:
    """Fine-tune model family FAMILY with each of its recipes on the images in INVERTED_DIR: checkpoint
    folders OUT_DIR/<recipe>, training logs LOG_DIR/<recipe>.json."""
    from ktpipe.finetune import run_finetune

    params = load_params(params_path, family)
    for recipe in params.recipes:
        summary = run_step(run_finetune, params, recipe, Path(concepts_dir), Path(inverted_dir),
                           Path(out_dir) / recipe, Path(log_dir) / f"{recipe}.json")
        click.echo(f"{family}: fine-tuned {recipe!r} on {summary['n_images']} images in {summary['seconds']} s")
