"""Stage evaluate@<model>: zero-shot classification on the val and test splits.

CHECKPOINT is a fine-tuned checkpoint folder, or 'base' for the model before transfer.
"""
import sys
from pathlib import Path

from ktpipe.errors import run_or_exit, stage_args
from ktpipe.params import load_params
from ktpipe.eval import run_evaluate


def main(tag: str, checkpoint: str, data_root: str, captions_dir: str, out_path: str) -> None:
    folder = None if checkpoint == "base" else Path(checkpoint)
    metrics = run_evaluate(load_params(), tag, folder, Path(data_root), Path(captions_dir), Path(out_path))
    print(f"{tag}: test target {metrics['test_name_target_acc']:.3f}, "
          f"retention {metrics.get('test_name_retention_acc', float('nan')):.3f} -> {out_path}")


if __name__ == "__main__":
    run_or_exit(main, *stage_args(sys.argv[1:], ["tag", "checkpoint", "data_root", "captions_dir", "out_path"]))
