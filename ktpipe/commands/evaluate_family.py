"""Stage evaluate_family@<family>: one model family's model before transfer and every recipe's, on its sets."""
from pathlib import Path

import click

from ktpipe.cli import PARAMS_OPTION, load_params, run_step


@click.command("evaluate_family")
@PARAMS_OPTION
@click.argument("family")
@click.argument("finetuned_dir", type=click.Path(file_okay=False))
@click.argument("eval_dir", type=click.Path(file_okay=False))
@click.argument("concepts_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
def command(params_path: str, family: str, finetuned_dir: str, eval_dir: str, concepts_dir: str, out_dir: str) -> None:
    """Evaluate model family FAMILY before transfer (as its `model` names it) and after each recipe
    (FINETUNED_DIR/<recipe>)
    on the sets of its `evaluate.use` in EVAL_DIR; write OUT_DIR/<model>.json (and per-item files beside)."""
    from ktpipe.eval import BASELINE, run_evaluate

    params = load_params(params_path, family)
    for model in params.models():
        model_dir = Path(params.model.pretrained or "") if model == BASELINE else Path(finetuned_dir) / model
        result = run_step(run_evaluate, params, model, model_dir, Path(eval_dir), Path(concepts_dir),
                          Path(out_dir) / f"{model}.json")
        for set_name, tasks in result["summary"].items():
            for task, shown in tasks.items():
                click.echo(f"{family} {model} on {set_name} ({task}): "
                           + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))
