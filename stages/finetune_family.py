"""Stage finetune_family@<family>: fine-tune every recipe of one model family (params `families`)."""
from pathlib import Path

import click

from ktpipe.cli import PARAMS_OPTION, family_option, load_params, run_command, run_step


@click.command("finetune_family")
@PARAMS_OPTION
@family_option(required=True)
@click.argument("concepts_dir", default="data/concepts", type=click.Path(file_okay=False))
@click.argument("inverted_dir", default="data/inverted", type=click.Path(file_okay=False))
@click.argument("out_dir", required=False, type=click.Path(file_okay=False))
@click.argument("log_dir", required=False, type=click.Path(file_okay=False))
def command(params_path: str, family: str, concepts_dir: str, inverted_dir: str, out_dir: str | None,
            log_dir: str | None) -> None:
    """Fine-tune model family --family with each of its recipes on the images in INVERTED_DIR:
    checkpoint folders OUT_DIR/<recipe> (default models/<family>/finetuned), training logs
    LOG_DIR/<recipe>.json (default metrics/<family>/finetune)."""
    from ktpipe.distributed import distribute
    from ktpipe.transfer.finetune import run_finetune

    params = load_params(params_path, family)
    distribute(params)
    out, logs = Path(out_dir or f"models/{family}/finetuned"), Path(log_dir or f"metrics/{family}/finetune")
    for recipe in params.recipes:
        summary = run_step(run_finetune, params, recipe, Path(concepts_dir), Path(inverted_dir), out / recipe,
                           logs / f"{recipe}.json")
        click.echo(f"{family}: fine-tuned {recipe!r} on {summary['n_images']} images in {summary['seconds']} s")


if __name__ == "__main__":
    run_command(command)
