"""Stage invert@<concept>: synthesize images of one concept from its description (Eq. 3)."""
from pathlib import Path

import click

from ktpipe.cli import FAMILY_OPTION, PARAMS_OPTION, load_params, run_step


@click.command("invert")
@PARAMS_OPTION
@FAMILY_OPTION
@click.argument("concept_file", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--timing", "timing_path", default=None, type=click.Path(dir_okay=False),
              help="Write the wall time to this JSON file (kept out of OUT_DIR so it stays cacheable).")
def command(params_path: str, family: str | None, concept_file: str, out_dir: str, timing_path: str | None) -> None:
    """Synthesize images of one concept (CONCEPT_FILE, from the concepts stage) into OUT_DIR:
    images.safetensors, grid.png and summary.json (final similarities and settings)."""
    from ktpipe.invert import run_invert

    timing = Path(timing_path) if timing_path else None
    meta = run_step(run_invert, load_params(params_path, family), Path(concept_file), Path(out_dir), timing)
    click.echo(f"inverted {meta['concept']!r} in {meta['seconds']} s -> {out_dir}")
