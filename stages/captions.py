"""Stage captions: the caption of every params concept (from its caption file, or an LLM), one file
per concept, and the demo world's concepts."""
from pathlib import Path

import click

from ktpipe.cli import PARAMS_OPTION, load_params, run_command, run_step


@click.command("captions")
@PARAMS_OPTION
@click.argument("captions_file", required=False, type=click.Path(dir_okay=False))
@click.argument("generated_file", required=False, type=click.Path(dir_okay=False))
@click.argument("out_dir", default="data/concepts", type=click.Path(file_okay=False))
@click.argument("world_path", default="data/world.json", type=click.Path(dir_okay=False))
@click.argument("known_path", default="data/known.json", type=click.Path(dir_okay=False))
def command(params_path: str, captions_file: str | None, generated_file: str | None, out_dir: str, world_path: str,
            known_path: str) -> None:
    """Caption every concept of params `concepts.names` from CAPTIONS_FILE (default: params
    `concepts.file`); write one JSON per concept into OUT_DIR, the demo world's concepts to WORLD_PATH
    and its known concepts alone (what pretraining reads) to KNOWN_PATH.

    Concepts CAPTIONS_FILE leaves undescribed take their entry in GENERATED_FILE (default: params
    `concepts.generated`), or a new one that the LLM of params `concepts.generator` writes there. A
    text longer than the text tower's context is an error unless params `concepts.truncate` is true.
    """
    from ktpipe.describe import run_concepts
    from ktpipe.models import load_base_text_budget

    params = load_params(params_path)
    budget = run_step(load_base_text_budget, params.model)
    concepts = run_step(run_concepts, Path(captions_file or params.concepts.file),
                        Path(generated_file or params.concepts.generated), params.concepts, Path(out_dir),
                        budget, Path(world_path), Path(known_path))
    click.echo(f"wrote {len(concepts)} concept captions to {out_dir}")


if __name__ == "__main__":
    run_command(command)
