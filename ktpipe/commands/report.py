"""Stage report: Markdown tables, the inverted-image figure, metrics and the lr plot data."""
from pathlib import Path

import click

from ktpipe.cli import PARAMS_OPTION, UserError, load_params, run_step


@click.command("report")
@PARAMS_OPTION
@click.argument("eval_dir", type=click.Path(file_okay=False))
@click.argument("concepts_dir", type=click.Path(file_okay=False))
@click.argument("inverted_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--family", "families", multiple=True, metavar="NAME=EVAL_DIR",
              help="Add model family NAME (params `families`), its evaluation results in EVAL_DIR; repeatable.")
@click.option("--families-dir", default=None, type=click.Path(file_okay=False),
              help="Add every model family of params `families`, NAME's evaluation results in DIR/NAME.")
def command(params_path: str, eval_dir: str, concepts_dir: str, inverted_dir: str, out_dir: str,
            families: tuple[str, ...], families_dir: str | None) -> None:
    """Write results.md, metrics.json, lr_curve.json and inverted.png into OUT_DIR."""
    from ktpipe.report import run_report

    params = load_params(params_path)
    family_dirs = {name: Path(families_dir) / name for name in params.families} if families_dir else {}
    for entry in families:
        name, sep, folder = entry.partition("=")
        if not (sep and name and folder):
            raise UserError(f"--family takes NAME=EVAL_DIR, got {entry!r}")
        family_dirs[name] = Path(folder)
    run_step(run_report, params, Path(eval_dir), Path(concepts_dir), Path(inverted_dir),
             Path(out_dir), family_dirs)
    click.echo(f"wrote {out_dir}/results.md")
