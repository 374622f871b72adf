"""Stage data: one manifest per evaluation set (the demo world is rendered here)."""
from pathlib import Path

import click

from ktpipe.cli import PARAMS_OPTION, load_params, run_command, run_step


@click.command("data")
@PARAMS_OPTION
@click.argument("world_path", default="data/world.json", type=click.Path(dir_okay=False))
@click.argument("out_dir", default="data/eval", type=click.Path(file_okay=False))
def command(params_path: str, world_path: str, out_dir: str) -> None:
    """Write one manifest per evaluation set (params `evaluate.sets`) into OUT_DIR; demo sets
    render the world of WORLD_PATH (written by the captions stage)."""
    from ktpipe.datasets import run_data

    summary = run_step(run_data, load_params(params_path), Path(out_dir), Path(world_path))
    for name, info in summary.items():
        click.echo(f"{name}: {info['n_images']} images of {len(info['classes'])} classes ({info['format']})")
    click.echo(f"wrote {len(summary)} evaluation set(s) to {out_dir}")


if __name__ == "__main__":
    run_command(command)
