"""Stage evaluate@<model>: zero-shot classification on every evaluation set.

CHECKPOINT is a fine-tuned checkpoint folder, or 'base' for the model before transfer.
"""
import sys
from pathlib import Path

from ktpipe.errors import run_or_exit, stage_args
from ktpipe.eval import run_evaluate
from ktpipe.params import load_params


def main(tag: str, checkpoint: str, eval_dir: str, captions_dir: str, out_path: str) -> None:
    params = load_params()
    folder = None if checkpoint == "base" else Path(checkpoint)
    metrics = run_evaluate(params, tag, folder, Path(eval_dir), Path(captions_dir), Path(out_path))
    for name in params.evaluate.sets:
        groups = ", ".join(f"{g} {metrics[f'{name}_name_{g}_acc']:.3f}" for g in ("target", "retention")
                           if f"{name}_name_{g}_acc" in metrics)
        print(f"{tag} on {name}: {groups}")
    print(f"-> {out_path}")


if __name__ == "__main__":
    run_or_exit(main, *stage_args(sys.argv[1:], ["tag", "checkpoint", "eval_dir", "captions_dir", "out_path"]))
