"""Stage report: Markdown tables, the inverted-image figure, metrics and the lr plot data."""
from pathlib import Path

import click

from ktpipe.cli import PARAMS_OPTION, load_params, run_step


@click.command("report")
@PARAMS_OPTION
@click.argument("eval_dir", type=click.Path(file_okay=False))
@click.argument("concepts_dir", type=click.Path(file_okay=False))
@click.argument("inverted_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
def command(params_path: str, eval_dir: str, concepts_dir: str, inverted_dir: str, out_dir: str) -> None:
    """Write results.md, metrics.json, lr_curve.json and inverted.png into OUT_DIR."""
    from ktpipe.report import run_report

    run_step(run_report, load_params(params_path), Path(eval_dir), Path(concepts_dir), Path(inverted_dir),
             Path(out_dir))
    click.echo(f"wrote {out_dir}/results.md")
