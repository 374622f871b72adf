"""Stage world: render the demo world's validation and test image folders."""
import sys
from pathlib import Path

from ktpipe.errors import run_or_exit, stage_args
from ktpipe.params import load_params
from ktpipe.world import load_world, write_splits


def main(out_dir: str) -> None:
    params = load_params()
    cfg = params.world
    counts = write_splits(load_world(), Path(out_dir), cfg.val_per_concept, cfg.test_per_concept,
                          params.seed, cfg.image_size)
    print(f"wrote {sum(counts['val'].values())} val and {sum(counts['test'].values())} test images to {out_dir}")


if __name__ == "__main__":
    run_or_exit(main, *stage_args(sys.argv[1:], ["out_dir"]))
