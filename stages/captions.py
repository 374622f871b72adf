"""Stage captions: describe every params concept and write one file per concept.

Concepts the captions file leaves undescribed take their entry in the generated file, or a new
one written there by the LLM of params `captions.generator`. Every text must fit the text tower's
context (params `captions.truncate` allows cutting). WORLD_PATH gets the demo world's concepts.
"""
import sys
from pathlib import Path

from ktpipe.captions import run_captions
from ktpipe.errors import run_or_exit, stage_args
from ktpipe.models import load_base_text_budget
from ktpipe.params import load_params


def main(captions_file: str, generated_file: str, out_dir: str, world_path: str) -> None:
    params = load_params()
    concepts = run_captions(Path(captions_file), Path(generated_file), params.concepts, Path(out_dir),
                            params.captions.generator, load_base_text_budget(params.model),
                            params.captions.truncate, Path(world_path))
    print(f"wrote {len(concepts)} concept descriptions to {out_dir}")


if __name__ == "__main__":
    run_or_exit(main, *stage_args(sys.argv[1:], ["captions_file", "generated_file", "out_dir", "world_path"]))
