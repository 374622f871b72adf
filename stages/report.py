"""Stage report: the figures, Markdown tables, metrics and lr plot data of every evaluation."""
from pathlib import Path

import click

from ktpipe.cli import PARAMS_OPTION, UserError, load_params, run_command, run_step


@click.command("report")
@PARAMS_OPTION
@click.argument("eval_dir", default="metrics/eval", type=click.Path(file_okay=False))
@click.argument("concepts_dir", default="data/concepts", type=click.Path(file_okay=False))
@click.argument("inverted_dir", default="data/inverted", type=click.Path(file_okay=False))
@click.argument("out_dir", default="reports", type=click.Path(file_okay=False))
@click.option("--family-results", "families", multiple=True, metavar="NAME=EVAL_DIR",
              help="Add model family NAME (params `families`), its evaluation results in EVAL_DIR; repeatable.")
@click.option("--families-dir", default="metrics/eval/families", show_default=True, type=click.Path(file_okay=False),
              help="Every model family of params `families`: NAME's evaluation results in DIR/NAME.")
def command(params_path: str, eval_dir: str, concepts_dir: str, inverted_dir: str, out_dir: str,
            families: tuple[str, ...], families_dir: str) -> None:
    """Write results.md, metrics.json, lr_curve/<recipe>.json, inverted.png and figures/ into OUT_DIR."""
    from ktpipe.report import run_report

    params = load_params(params_path)
    family_dirs = {name: Path(families_dir) / name for name in params.families}
    for entry in families:
        name, sep, folder = entry.partition("=")
        if not (sep and name and folder):
            raise UserError(f"--family-results takes NAME=EVAL_DIR, got {entry!r}")
        family_dirs[name] = Path(folder)
    run_step(run_report, params, Path(eval_dir), Path(concepts_dir), Path(inverted_dir),
             Path(out_dir), family_dirs)
    click.echo(f"wrote {out_dir}/results.md")


if __name__ == "__main__":
    run_command(command)
