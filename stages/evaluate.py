"""Stage evaluate_baseline and evaluate@<recipe>: every evaluation set's task, for the model before
transfer or a recipe's."""
from pathlib import Path

import click

from ktpipe.cli import FAMILY_OPTION, PARAMS_OPTION, load_params, run_command, run_step


@click.command("evaluate")
@PARAMS_OPTION
@FAMILY_OPTION
@click.argument("model")
@click.argument("model_dir", required=False, type=click.Path(file_okay=False))
@click.argument("eval_dir", default="data/eval", type=click.Path(file_okay=False))
@click.argument("concepts_dir", default="data/concepts", type=click.Path(file_okay=False))
@click.argument("out_path", required=False, type=click.Path(dir_okay=False))
@click.option("--store", default=".ktpipe/store/embed", show_default=True, type=click.Path(file_okay=False),
              help="Image embeddings of earlier evaluations by the digest of the model and the images: found "
                   "here, they are read, not recomputed ('' embeds every image).")
def command(params_path: str, family: str | None, model: str, model_dir: str | None, eval_dir: str,
            concepts_dir: str, out_path: str | None, store: str) -> None:
    """Evaluate MODEL (`baseline`: the model before transfer, as params `model` names it; else a
    recipe whose checkpoint is MODEL_DIR, default models/<recipe>) on every set of params
    `evaluate.sets` in EVAL_DIR (written by the data stage); write the metrics JSON OUT_PATH
    (default metrics/eval/<model>.json) and per-item files beside it. A model's image embeddings
    are kept in --store and reused when the same model meets the same images again."""
    from ktpipe.distributed import distribute
    from ktpipe.eval import run_evaluate

    params = load_params(params_path, family)
    distribute(params)
    out_path = out_path or f"metrics/eval/{model}.json"
    result = run_step(run_evaluate, params, model, Path(model_dir or f"models/{model}"), Path(eval_dir),
                      Path(concepts_dir), Path(out_path), store or None)
    for set_name, tasks in result["metrics"].items():
        for task, metrics in tasks.items():
            shown = ", ".join(f"{k} {v:.3f}" for k, v in result["summary"][set_name][task].items())
            click.echo(f"{model} on {set_name} ({task}): {shown}")
    click.echo(f"-> {out_path}")


if __name__ == "__main__":
    run_command(command)
