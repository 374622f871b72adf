"""Stage base_model: pretrain the demo model, or record the real model params name."""
import sys
from pathlib import Path

from ktpipe.base_model import run_base_model
from ktpipe.errors import run_or_exit, stage_args
from ktpipe.params import load_params


def main(world_path: str, out_dir: str, log_path: str) -> None:
    summary = run_base_model(load_params(), Path(out_dir), Path(log_path), Path(world_path))
    print(f"base model ready in {summary['seconds']} s -> {out_dir}")


if __name__ == "__main__":
    run_or_exit(main, *stage_args(sys.argv[1:], ["world_path", "out_dir", "log_path"]))
