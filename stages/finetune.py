"""Stage finetune@<recipe>: InfoNCE fine-tuning on inverted images (Eq. 2)."""
import sys
from pathlib import Path

from ktpipe.errors import run_or_exit, stage_args
from ktpipe.params import load_params
from ktpipe.finetune import run_finetune


def main(recipe: str, captions_dir: str, inverted_dir: str, out_dir: str, log_path: str) -> None:
    summary = run_finetune(load_params(), recipe, Path(captions_dir), Path(inverted_dir), Path(out_dir), Path(log_path))
    print(f"fine-tuned {recipe!r} on {summary['n_images']} images in {summary['seconds']} s -> {out_dir}")


if __name__ == "__main__":
    run_or_exit(main, *stage_args(sys.argv[1:], ["recipe", "captions_dir", "inverted_dir", "out_dir", "log_path"]))
