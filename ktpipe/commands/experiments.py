"""`ktpipe experiments`: summarize finished DVC experiments (not a stage)."""
import click

from ktpipe.cli import run_step


@click.command("experiments")
@click.option("--lr", type=float, required=True, help="Learning rate whose seeds are summarized.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the learning-rate table.")
@click.option("--test-set", default="test", show_default=True, help="Evaluation set of the seed table.")
@click.option("--val-set", default="val", show_default=True, help="Evaluation set of the learning-rate table.")
@click.option("--out", "out_path", default="reports/experiments.md", show_default=True,
              help="Markdown file to write.")
def command(lr: float, seed: int, test_set: str, val_set: str, out_path: str) -> None:
    """Summarize finished DVC experiments: mean over seeds, and accuracy against lr."""
    from ktpipe.experiments import load_experiments, render
    from ktpipe.io import write_text

    text = run_step(lambda: render(load_experiments("."), lr, seed, test_set, val_set))
    write_text(out_path, text)
    click.echo(text)
