"""Stage evaluate_family@<family>: one model family's model before transfer and every recipe's, on its sets."""
from pathlib import Path

import click

from ktpipe.cli import PARAMS_OPTION, family_option, load_params, run_command, run_step


@click.command("evaluate_family")
@PARAMS_OPTION
@family_option(required=True)
@click.argument("finetuned_dir", required=False, type=click.Path(file_okay=False))
@click.argument("eval_dir", default="data/eval", type=click.Path(file_okay=False))
@click.argument("concepts_dir", default="data/concepts", type=click.Path(file_okay=False))
@click.argument("out_dir", required=False, type=click.Path(file_okay=False))
def command(params_path: str, family: str, finetuned_dir: str | None, eval_dir: str, concepts_dir: str,
            out_dir: str | None) -> None:
    """Evaluate model family --family before transfer (as its `model` names it) and after each recipe
    (FINETUNED_DIR/<recipe>, default models/<family>/finetuned) on the sets of its `evaluate.use` in
    EVAL_DIR; write OUT_DIR/<model>.json (default metrics/eval/families/<family>) and per-item files."""
    from ktpipe.distributed import distribute
    from ktpipe.eval import BASELINE, run_evaluate

    params = load_params(params_path, family)
    distribute(params)
    finetuned = Path(finetuned_dir or f"models/{family}/finetuned")
    out = Path(out_dir or f"metrics/eval/families/{family}")
    for model in params.models():
        model_dir = Path(params.model.pretrained or "") if model == BASELINE else finetuned / model
        result = run_step(run_evaluate, params, model, model_dir, Path(eval_dir), Path(concepts_dir),
                          out / f"{model}.json")
        for set_name, tasks in result["summary"].items():
            for task, shown in tasks.items():
                click.echo(f"{family} {model} on {set_name} ({task}): "
                           + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))


if __name__ == "__main__":
    run_command(command)
