"""Stage pretrain: train the tiny demo CLIP from scratch on the demo world (CPU, minutes)."""
import sys
from pathlib import Path

from ktpipe.errors import run_or_exit, stage_args
from ktpipe.params import load_params
from ktpipe.pretrain import run_pretrain


def main(out_dir: str, log_path: str) -> None:
    summary = run_pretrain(load_params(), Path(out_dir), Path(log_path))
    print(f"pretrained in {summary['seconds']} s, final losses {summary['final']}; saved {out_dir}")


if __name__ == "__main__":
    run_or_exit(main, *stage_args(sys.argv[1:], ["out_dir", "log_path"]))
