"""Stage concepts: describe every params concept and write one file per concept."""
from pathlib import Path

import click

from ktpipe.cli import PARAMS_OPTION, load_params, run_step


@click.command("concepts")
@PARAMS_OPTION
@click.argument("concepts_file", type=click.Path(dir_okay=False))
@click.argument("generated_file", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.argument("world_path", type=click.Path(dir_okay=False))
@click.argument("known_path", type=click.Path(dir_okay=False))
def command(params_path: str, concepts_file: str, generated_file: str, out_dir: str, world_path: str,
            known_path: str) -> None:
    """Describe every concept of params `concepts.names` from CONCEPTS_FILE; write one JSON per
    concept into OUT_DIR, the demo world's concepts to WORLD_PATH and its known concepts alone (what
    pretraining reads) to KNOWN_PATH.

    Concepts CONCEPTS_FILE leaves undescribed take their entry in GENERATED_FILE, or a new one
    that the LLM of params `concepts.generator` writes there. A text longer than the text tower's
    context is an error unless params `concepts.truncate` is true.
    """
    from ktpipe.describe import run_concepts
    from ktpipe.models import load_base_text_budget

    params = load_params(params_path)
    budget = run_step(load_base_text_budget, params.model)
    concepts = run_step(run_concepts, Path(concepts_file), Path(generated_file), params.concepts, Path(out_dir),
                        budget, Path(world_path), Path(known_path))
    click.echo(f"wrote {len(concepts)} concept descriptions to {out_dir}")
