"""`ktpipe preset NAME`: apply a paper preset as params.yaml (not a stage)."""
from pathlib import Path

import click

from ktpipe.cli import run_step


@click.command("preset")
@click.argument("name", required=False)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
              help="Params file to write.")
@click.option("--presets-dir", default="presets", show_default=True, type=click.Path(file_okay=False),
              help="Folder of the presets.")
@click.option("--force", is_flag=True, help="Overwrite uncommitted edits of the params file.")
def command(name: str | None, params_path: str, presets_dir: str, force: bool) -> None:
    """Write preset NAME (presets/NAME.yaml) over params.yaml; without NAME, list the presets."""
    from ktpipe.presets import apply_preset, list_presets

    if name is None:
        click.echo("\n".join(list_presets(Path(presets_dir))))
        return
    source = run_step(apply_preset, name, Path(presets_dir), Path(params_path), force)
    click.echo(f"{params_path} <- {source}; run it with `dvc exp run` (README \"Reproducing the paper\")")
