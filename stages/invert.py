"""Stage invert: synthesize images of every concept from its caption (Eq. 3), in one process."""
from pathlib import Path

import click

from ktpipe.cli import FAMILY_OPTION, PARAMS_OPTION, load_params, run_command, run_step


@click.command("invert")
@PARAMS_OPTION
@FAMILY_OPTION
@click.argument("source", default="data/concepts")
@click.argument("out_dir", required=False, type=click.Path(file_okay=False))
@click.option("--timing", "timing_path", default=None, type=click.Path(dir_okay=False),
              help="Write the wall times to this JSON file, kept out of OUT_DIR so it stays cacheable "
                   "(default: metrics/invert.json; metrics/invert/<concept>.json for one concept).")
@click.option("--store", default=".ktpipe/store/invert", show_default=True, type=click.Path(file_okay=False),
              help="Folders of earlier inversions by the digest of their inputs: a concept found here is "
                   "copied, not recomputed ('' computes every concept).")
def command(params_path: str, family: str | None, source: str, out_dir: str | None, timing_path: str | None,
            store: str) -> None:
    """Synthesize images of each concept of params `concepts.names` from its file in SOURCE (the captions
    stage's folder, default data/concepts) into OUT_DIR/<name>/ (default data/inverted):
    images.safetensors, grid.png and summary.json per concept. SOURCE may also be one concept (its file, or
    its name), inverted into OUT_DIR (default data/inverted/<name>)."""
    from ktpipe.distributed import distribute
    from ktpipe.transfer.invert import run_invert, run_invert_all

    params = load_params(params_path, family)
    distribute(params)
    if not source.endswith(".json") and (Path(source).is_dir() or "/" in source):
        out = Path(out_dir or "data/inverted")
        timing = run_step(run_invert_all, params, Path(source), out, Path(timing_path or "metrics/invert.json"),
                          store or None)
        counts = [entry["how"] for entry in timing["concepts"].values()]
        click.echo(f"inverted {counts.count('computed')} concepts, reused {counts.count('reused')} from {store} "
                   f"in {timing['seconds']} s -> {out}")
        return
    concept_file = Path(source) if source.endswith(".json") else Path("data/concepts") / f"{source}.json"
    name = concept_file.stem
    out = Path(out_dir or f"data/inverted/{name}")
    timing = Path(timing_path or f"metrics/invert/{name}.json")
    meta = run_step(run_invert, params, concept_file, out, timing)
    click.echo(f"inverted {meta['concept']!r} in {meta['seconds']} s -> {out}")


if __name__ == "__main__":
    run_command(command)
