"""kill -9 of a stage mid-inversion, mid-fine-tuning and mid-evaluation, then `dvc repro`: the
outputs are bit-identical to an uninterrupted run, and no half-written folder is taken for a result.

A git+DVC repo holds a tiny project (the tiny random-init CLIP, 3 concepts, captions and
evaluation manifests made beforehand) and the three stages as dvc.yaml runs them (invert without
the inversion store and evaluate without the embedding store, so a rerun computes). An uninterrupted `dvc repro` gives the reference
bytes. Then, for each stage, its output and DVC's cache are deleted (so nothing can be checked out
instead of computed; `dvc commit` puts the other stages' outputs back) and `dvc repro` runs in the
background; once the stage's process has opened
its temporary output folder (`.<name>.tmp-<id>`, which `ktpipe.io.atomic_dir`
renames into place only when the stage succeeds) the test sends it SIGKILL, as the OOM killer
would. DVC reports the stage failed; the output path holds no result (DVC removed the old one
before the run and the new one never got its name; or, when the kill lands after the rename on a
fast machine, a whole one); `dvc repro` computes it again, its files equal
the reference bytes, and the stages after it are skipped (their inputs came out the same).
"""
from __future__ import annotations

import json
import shutil
import signal
import threading
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from ruamel.yaml import YAML

from conftest import REPO, make_project, run_stage_here, write_params
from test_determinism import without_wall_times
from test_dvc_e2e import Repo

pytestmark = pytest.mark.slow

DVC_YAML = """
stages:
  invert:
    cmd: python -m stages.invert data/concepts data/inverted --store ''
    deps: [data/concepts]
    params: [seed, invert]
    outs: [data/inverted]
  finetune:
    cmd: python -m stages.finetune paper data/concepts data/inverted models/paper metrics/finetune/paper.json
    deps: [data/concepts, data/inverted]
    params: [lr, finetune, recipes]
    outs: [models/paper]
    metrics: [{metrics/finetune/paper.json: {cache: false}}]
  evaluate:
    cmd: python -m stages.evaluate paper models/paper data/eval data/concepts metrics/eval/paper.json --store ''
    deps: [models/paper, data/eval, data/concepts]
    params: [evaluate]
    outs: [metrics/eval/paper]
    metrics: [{metrics/eval/paper.json: {cache: false}}]
"""
# stage -> (the progress text that shows it computing, its outputs)
STAGES = {"invert": ("invert dax", ("data/inverted",)),
          "finetune": ("epoch 2/24", ("models/paper", "metrics/finetune/paper.json")),
          "evaluate": ("embed", ("metrics/eval/paper", "metrics/eval/paper.json"))}


def files(repo: Repo, stage: str) -> dict[str, object]:
    """The stage's output files, by bytes (JSON metrics without their wall times)."""
    found: dict[str, object] = {}
    for name in STAGES[stage][1]:
        path = repo.root / name
        if path.suffix == ".json":
            found[name] = without_wall_times(json.loads(path.read_text())) if path.is_file() else None
        elif path.is_dir():
            found.update({str(p.relative_to(repo.root)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()})
    return found


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_checkpoint) -> Repo:
    root = tmp_path_factory.mktemp("crash") / "repo"
    make_project(root, tiny_checkpoint)
    # each stage computes for a second or more, to be killed in the middle: 20 inversion steps of 4
    # images per concept, 24 epochs (killed in the second: the 22 left take seconds, longer than the
    # test takes to see the progress text on 2 busy cores), 4 test images per concept
    write_params(root, concepts={"names": ["blicket", "dax", "lantern"]}, invert={"steps": 20, "samples": 4},
                 finetune={"epochs": 24}, recipes={"paper": {"rehearsal": False}},
                 world={"val_per_concept": 2, "test_per_concept": 4})
    for args in (("captions", "captions/demo.yaml", "captions/generated.yaml", "data/concepts", "data/world.json",
                  "data/known.json"), ("data", "data/world.json", "data/eval")):
        result = run_stage_here(root, *args)
        assert result.returncode == 0, result.stderr
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style, yaml.width = False, 4096  # block style, no wrapped paths (DVC's reader)
    params = yaml.load((root / "params.yaml").read_text())
    with (root / "params.yaml").open("w") as fh:
        yaml.dump(params, fh)
    for folder in ("stages", "ktpipe"):
        (root / folder).symlink_to(REPO / folder)  # `python -m stages.<stage>` as in a clone
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / ".gitignore").write_text("/data/inverted\n/models\n/metrics/eval/paper\n")
    repo = Repo(root)
    repo.env["PYTHONPATH"] = str(REPO)
    repo.git("init", "-q")
    repo.dvc("init", "-q")
    repo.commit("tiny project")
    output = repo.dvc("repro")
    assert all(f"Running stage '{s}'" in output for s in STAGES), output
    return repo


def stage_process(dvc: psutil.Process) -> psutil.Process | None:
    """The stage's `python -m stages.<stage>` process among DVC's descendants."""
    for child in dvc.children(recursive=True):
        try:
            if any(part.startswith("stages.") for part in child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def kill_mid_stage(repo: Repo, stage: str) -> str:
    """Run `dvc repro` (progress bars on) and SIGKILL the stage's process once its progress text
    shows it computing; returns DVC's output."""
    marker = STAGES[stage][0]
    env = {k: v for k, v in repo.env.items() if k != "TQDM_DISABLE"}
    dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo.root, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: dvc.stdout.read(1), "")), daemon=True)
    reader.start()
    deadline, killed = time.monotonic() + 180, False
    while time.monotonic() < deadline and dvc.poll() is None:
        child = stage_process(psutil.Process(dvc.pid))
        if child is not None and marker in "".join(seen[-4000:]):
            child.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    dvc.wait(timeout=120)
    reader.join(timeout=10)
    output = "".join(seen)
    assert killed, f"{stage} ended before it could be killed:\n{output}"
    assert dvc.returncode != 0, output
    return output


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_killed_mid_run_reruns_to_the_same_bytes(repo, stage):
    reference = files(repo, stage)
    assert reference and all(value is not None for value in reference.values())
    folder = repo.root / STAGES[stage][1][0]

    shutil.rmtree(repo.root / ".dvc/cache")  # no copy of any output, nor DVC's run-cache: the stage must compute
    repo.dvc("commit", "-f", *(s for s in STAGES if s != stage))  # the others' outputs back: not stale
    shutil.rmtree(folder)
    output = kill_mid_stage(repo, stage)
    assert f"failed to reproduce '{stage}'" in output, output
    # no result under the output's name: it was never renamed into place; or, where the kill came after the
    # rename (the tiny evaluation can end within one poll of its progress text on a fast machine), a whole one
    if folder.exists():
        inside = {k: v for k, v in reference.items() if k.startswith(f"{STAGES[stage][1][0]}/")}
        assert {str(p.relative_to(repo.root)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == inside
    assert stage in repo.status()  # and DVC takes nothing of the killed run for one

    output = repo.dvc("repro")
    assert f"Running stage '{stage}'" in output and "is cached" not in output, output
    assert files(repo, stage) == reference
    after = list(STAGES)[list(STAGES).index(stage) + 1:]  # their inputs came out the same: not rerun
    assert all(f"Stage '{later}' didn't change, skipping" in output for later in after), output
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.tmp-")]
    assert len(leftovers) <= 1  # at most the killed run's temporary folder; the rerun left none
