"""What every `dvc repro` stage pays before and after its own work: the imports of a new process, the
interpreter's teardown at its end (which a stage, `python -m stages.<stage>`, skips) and DVC's bookkeeping of `dvc.lock`.

Each import row runs in fresh interpreters (`--repeats` times, the median printed) and adds one
library to the row above, so the differences are what each library costs on top of the others:

    python benchmarks/stage_startup.py              # from the project root, on an idle machine
    python benchmarks/stage_startup.py --repeats 5 --lock dvc.lock
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import subprocess
import sys
import time
from pathlib import Path

STEP = "w = torch.zeros(2, requires_grad=True); o = torch.optim.AdamW([w]); w.sum().backward(); o.step()"
# (label, code run in a fresh interpreter); each row imports what the row above imports, plus one thing
IMPORT_STEPS = [
    ("interpreter", "pass"),
    ("+ torch", "import torch"),
    ("+ torch.optim's first step (imports torch._dynamo)", f"import torch; {STEP}"),
    ("+ transformers", f"import torch, transformers; {STEP}"),
    ("+ open_clip (a demo CLIP stage's imports)", f"import torch, transformers, open_clip; {STEP}"),
]


def seconds(argv: list[str], repeats: int, **kwargs) -> float:
    """Median wall time of running `argv` `repeats` times (`kwargs`: subprocess.run's env, cwd)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lock_costs(lock: Path, repeats: int) -> dict[str, float]:
    """What DVC does with `dvc.lock` around each stage: a safe load (C loader when ruamel.yaml.clib is
    installed) and the round-trip parse and dump that rewrites it."""
    from ruamel.yaml import YAML

    text = lock.read_text()
    if importlib.util.find_spec("_ruamel_yaml"):  # the C loader of ruamel.yaml.clib
        loaders = [("safe load, C loader (ruamel.yaml.clib)", False), ("safe load, pure Python", True)]
    else:
        loaders = [("safe load, pure Python (no ruamel.yaml.clib)", True)]
    out = {}
    for label, pure in loaders:
        yaml = YAML(typ="safe", pure=pure)
        out[label] = min(timed(lambda: yaml.load(text)) for _ in range(repeats))

    def rewrite():
        yaml = YAML()
        yaml.dump(yaml.load(text), io.StringIO())

    out["round-trip parse + dump (each stage)"] = min(timed(rewrite) for _ in range(repeats))
    return out


PROBE_STAGE = """import click
from ktpipe.cli import run_command

def probe():
    import monai, open_clip, torch  # as a stage does: after its command line is parsed

run_command(click.Command("probe", callback=probe))
"""


def warm_start(repeats: int) -> tuple[float, float]:
    """Median wall time of a probe stage (`python -m stages.probe`, importing what an evaluate stage
    imports) on its own (`KTPIPE_WARM=0`), and served by a warm-start server started for it."""
    import os
    import tempfile

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    from ktpipe.warm import stop_servers

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "stages").mkdir()
        (root / "stages/__init__.py").write_text("")
        (root / "stages/probe.py").write_text(PROBE_STAGE)
        env = {**os.environ, "KTPIPE_WARM_DIR": str(root / "servers"), "PYTHONPATH": os.pathsep.join(
            [str(root), str(repo), os.environ.get("PYTHONPATH", "")])}
        argv = [sys.executable, "-m", "stages.probe"]
        cold = seconds(argv, repeats, env={**env, "KTPIPE_WARM": "0"}, cwd=root)
        seconds(argv, 1, env=env, cwd=root)  # starts the server
        deadline = time.monotonic() + 300
        while not list((root / "servers").glob("*.sock")) and time.monotonic() < deadline:
            time.sleep(0.2)
        try:
            warm = seconds(argv, repeats, env=env, cwd=root)
        finally:
            stop_servers(root / "servers")
    return cold, warm


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lock", type=Path, default=Path("dvc.lock"))
    args = parser.parse_args()

    print(f"python {sys.version.split()[0]}; median of {args.repeats} fresh interpreters per row\n")
    print(f"{'imports':55s} {'s':>6s} {'added':>6s}")
    previous = 0.0
    for label, code in IMPORT_STEPS:
        took = seconds([sys.executable, "-c", code], args.repeats)
        print(f"{label:55s} {took:6.2f} {took - previous:6.2f}")
        previous = took
    skipped = seconds([sys.executable, "-c", f"{IMPORT_STEPS[-1][1]}; import os; os._exit(0)"], args.repeats)
    print(f"{'the row above ending in os._exit, as a stage does':55s} {skipped:6.2f} {skipped - previous:6.2f}"
          "  (the interpreter's teardown)")
    took = seconds([sys.executable, "-m", "stages", "--help"], args.repeats)
    print(f"{'python -m stages --help (the CLI alone)':55s} {took:6.2f}")

    cold, warm = warm_start(args.repeats)
    print(f"\n{'a stage importing torch, open_clip and MONAI, run alone':55s} {cold:6.2f}")
    print(f"{'the same stage, forked from the warm-start server':55s} {warm:6.2f}  (ktpipe/warm.py)")

    if args.lock.is_file():
        print(f"\n{args.lock} ({args.lock.stat().st_size / 1024:.0f} KB), best of {args.repeats}")
        for label, took in lock_costs(args.lock, args.repeats).items():
            print(f"{label:55s} {took:6.2f}")
        took = seconds(["dvc", "status", "-q"], args.repeats)
        print(f"{'dvc status (whole pipeline, nothing to run)':55s} {took:6.2f}")


if __name__ == "__main__":
    main()
