"""Stage invert@<concept>: synthesize images of one concept from its caption (Eq. 3)."""
from pathlib import Path

import click

from ktpipe.cli import FAMILY_OPTION, PARAMS_OPTION, load_params, run_command, run_step


@click.command("invert")
@PARAMS_OPTION
@FAMILY_OPTION
@click.argument("concept")
@click.argument("out_dir", required=False, type=click.Path(file_okay=False))
@click.option("--timing", "timing_path", default=None, type=click.Path(dir_okay=False),
              help="Write the wall time to this JSON file, kept out of OUT_DIR so it stays cacheable "
                   "(default: metrics/invert/<concept>.json).")
def command(params_path: str, family: str | None, concept: str, out_dir: str | None, timing_path: str | None) -> None:
    """Synthesize images of CONCEPT (its file from the captions stage, or its name: data/concepts/<name>.json)
    into OUT_DIR (default data/inverted/<name>): images.safetensors, grid.png and summary.json."""
    from ktpipe.transfer.invert import run_invert

    concept_file = Path(concept) if concept.endswith(".json") else Path("data/concepts") / f"{concept}.json"
    name = concept_file.stem
    out = Path(out_dir or f"data/inverted/{name}")
    timing = Path(timing_path or f"metrics/invert/{name}.json")
    meta = run_step(run_invert, load_params(params_path, family), concept_file, out, timing)
    click.echo(f"inverted {meta['concept']!r} in {meta['seconds']} s -> {out}")


if __name__ == "__main__":
    run_command(command)
