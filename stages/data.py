"""Stage data: one manifest per evaluation set (the demo world is rendered here)."""
import sys
from pathlib import Path

from ktpipe.errors import run_or_exit, stage_args
from ktpipe.evalsets import run_data
from ktpipe.params import load_params


def main(world_path: str, out_dir: str) -> None:
    summary = run_data(load_params(), Path(out_dir), Path(world_path))
    for name, info in summary.items():
        print(f"{name}: {info['n_images']} images of {len(info['classes'])} classes ({info['format']})")
    print(f"wrote {len(summary)} evaluation set(s) to {out_dir}")


if __name__ == "__main__":
    run_or_exit(main, *stage_args(sys.argv[1:], ["world_path", "out_dir"]))
