"""`ktpipe experiments`: summarize finished DVC experiments (not a stage)."""
import click

from ktpipe.cli import PARAMS_OPTION, load_params, run_step


@click.command("experiments")
@PARAMS_OPTION
@click.option("--lr", type=float, default=None, help="Learning rate whose seeds are summarized (default: params `lr`).")
@click.option("--seed", type=int, default=None, help="Seed of the learning-rate table (default: params `seed`).")
@click.option("--test-set", default="test", show_default=True, help="Evaluation set of the seed table.")
@click.option("--val-set", default="val", show_default=True, help="Evaluation set of the learning-rate table.")
@click.option("--out", "out_path", default="reports/experiments.md", show_default=True,
              help="Markdown file to write.")
def command(params_path: str, lr: float | None, seed: int | None, test_set: str, val_set: str, out_path: str) -> None:
    """Summarize finished DVC experiments: mean over seeds, accuracy against lr (a table and a PNG
    beside the Markdown, lr_sweep.png) and the forgetting trade-off across the sweep (tradeoff_sweep.png,
    its Pareto front, the best target at 95% and 99% of the base model's retention)."""
    from pathlib import Path

    from ktpipe.experiments import (baseline_retention, load_experiments, lr_curves, lr_table, render, sweep_points,
                                    tradeoff_lines)
    from ktpipe.io import write_text
    from ktpipe.report.figures import save_lr_figure
    from ktpipe.report.tradeoff import save_tradeoff_figure

    if lr is None or seed is None:
        params = load_params(params_path)
        lr = params.lr if lr is None else lr
        seed = params.seed if seed is None else seed
    frame = run_step(load_experiments, ".")
    figure, tradeoff = Path(out_path).with_name("lr_sweep.png"), Path(out_path).with_name("tradeoff_sweep.png")
    table = run_step(lr_table, frame, seed, val_set)
    curves = lr_curves(table)
    lines = tradeoff_lines(curves, baseline_retention(table), tradeoff.name) if curves else []
    text = run_step(render, frame, lr, seed, test_set, val_set, figure.name if curves else None, lines)
    if curves:
        save_lr_figure(curves, figure, f"`{val_set}` against learning rate (seed {seed})")
        save_tradeoff_figure(sweep_points(curves), tradeoff)
    write_text(out_path, text)
    click.echo(text)
