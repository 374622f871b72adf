"""Stage captions: describe every params concept and write one file per concept.

Concepts the captions file leaves undescribed take their entry in the generated file, or a new
one written there by the LLM of params `captions.generator`.
"""
import sys
from pathlib import Path

from ktpipe.errors import run_or_exit, stage_args
from ktpipe.params import load_params
from ktpipe.captions import run_captions


def main(captions_file: str, generated_file: str, out_dir: str) -> None:
    params = load_params()
    concepts = run_captions(Path(captions_file), Path(generated_file), params.concepts, Path(out_dir),
                            params.captions.generator)
    print(f"wrote {len(concepts)} concept descriptions to {out_dir}")


if __name__ == "__main__":
    run_or_exit(main, *stage_args(sys.argv[1:], ["captions_file", "generated_file", "out_dir"]))
