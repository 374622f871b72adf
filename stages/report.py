"""Stage report: Markdown table, inverted-image figure, metrics and the lr plot data."""
import sys
from pathlib import Path

from ktpipe.errors import run_or_exit, stage_args
from ktpipe.params import load_params
from ktpipe.report import run_report


def main(eval_dir: str, captions_dir: str, inverted_dir: str, out_dir: str) -> None:
    run_report(load_params(), Path(eval_dir), Path(captions_dir), Path(inverted_dir), Path(out_dir))
    print(f"wrote report to {out_dir}/results.md")


if __name__ == "__main__":
    run_or_exit(main, *stage_args(sys.argv[1:], ["eval_dir", "captions_dir", "inverted_dir", "out_dir"]))
