"""Stage captions: validate the concept descriptions and write one file per concept."""
import sys
from pathlib import Path

from ktpipe.errors import run_or_exit, stage_args
from ktpipe.params import load_params
from ktpipe.captions import run_captions


def main(captions_file: str, out_dir: str) -> None:
    concepts = run_captions(Path(captions_file), load_params().concepts, Path(out_dir))
    print(f"wrote {len(concepts)} concept descriptions to {out_dir}")


if __name__ == "__main__":
    run_or_exit(main, *stage_args(sys.argv[1:], ["captions_file", "out_dir"]))
