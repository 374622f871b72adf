"""Stage invert@<concept>: synthesize images of one concept from its description (Eq. 3)."""
import sys
from pathlib import Path

from ktpipe.errors import run_or_exit, stage_args
from ktpipe.params import load_params
from ktpipe.invert import run_invert


def main(concept_file: str, out_dir: str, timing_path: str) -> None:
    meta = run_invert(load_params(), Path(concept_file), Path(out_dir), Path(timing_path))
    print(f"inverted {meta['concept']!r} in {meta['seconds']} s -> {out_dir}")


if __name__ == "__main__":
    run_or_exit(main, *stage_args(sys.argv[1:], ["concept_file", "out_dir", "timing_path"]))
