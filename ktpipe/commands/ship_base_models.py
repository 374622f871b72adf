"""`ktpipe ship_base_models`: pretrain the demo's base models and write them into the package (not a stage)."""
import json
import tempfile
from pathlib import Path

import click

from ktpipe.cli import PARAMS_OPTION, load_params, run_step


@click.command("ship_base_models")
@PARAMS_OPTION
@click.option("--out", "out_root", default=None, type=click.Path(file_okay=False),
              help="Folder of the shipped models (default: ktpipe/demo/base_models in the package).")
def command(params_path: str, out_root: str | None) -> None:
    """Pretrain the demo CLIP, ViLT and CoCa of the params file from scratch (about 6 minutes on 2
    CPU cores) and write each with its provenance record where the base_model stage finds them."""
    from ktpipe.concepts import load_concepts_file, world_concepts
    from ktpipe.demo.shipped import SHIPPED, ship_base_models

    params = load_params(params_path)
    entries = run_step(load_concepts_file, Path(params.concepts.file))
    known = {name: c for name, c in world_concepts(entries).items() if c["role"] == "known"}
    with tempfile.TemporaryDirectory() as tmp:
        known_path = Path(tmp) / "known.json"
        known_path.write_text(json.dumps(known, indent=2, sort_keys=True) + "\n")
        shipped = run_step(ship_base_models, params, known_path, Path(out_root) if out_root else SHIPPED)
    click.echo(f"shipped {', '.join(shipped)} -> {out_root or SHIPPED}")
