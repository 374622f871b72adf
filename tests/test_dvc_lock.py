"""The committed `dvc.lock` records the committed code, data files and params.

When it does, a fresh clone's `dvc repro` reruns only the stages whose outputs are not in git
(pretraining, inversion, fine-tuning) and finds the committed evaluation results and report up
to date. A code change committed without `dvc repro` leaves the lock behind: every user's first
run then redoes those stages. Outputs absent from a checkout (models, inverted images) are not
this test's business; only git-tracked dependencies, params and commands are compared.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]


def overlaps(path: str, paths: set[str]) -> bool:
    """`path` is one of `paths`, holds one of them, or lies inside one."""
    return any(p == path or p.startswith(f"{path}/") or path.startswith(f"{p}/") for p in paths)


def stale_entries(status: dict, tracked: set[str], outs: set[str]) -> list[str]:
    """'stage: what changed' for every git-tracked dep, param or command that differs from the
    lock; a dep that stages write (in, or holding, `outs`) is their business, not the lock's."""
    stale = []
    for stage, changes in status.items():
        for change in changes:
            if not isinstance(change, dict):  # "changed checksum", "always changed"
                stale.append(f"{stage}: {change}")
                continue
            for path, state in change.get("changed deps", {}).items():
                if isinstance(state, dict):  # params file: {key: state}
                    stale += [f"{stage}: {path} {key} {s}" for key, s in state.items()]
                elif state == "modified" and not overlaps(path, outs) and overlaps(path, tracked):
                    stale.append(f"{stage}: {path} {state}")
            if "changed command" in change:
                stale.append(f"{stage}: command changed")
    return stale


def test_lock_records_the_committed_code_and_params():
    from dvc.repo import Repo

    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.split())
    lock = YAML(typ="safe").load((REPO / "dvc.lock").read_text())
    outs = {out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])}
    with Repo(str(REPO)) as repo:
        status = repo.status()
    stale = stale_entries(status, tracked, outs)
    assert not stale, ("dvc.lock is behind the code or params; run `dvc repro` and commit dvc.lock "
                       f"with the change:\n" + "\n".join(stale))


def test_stale_entries_name_code_params_and_commands_but_not_outputs():
    status = {
        "evaluate@full": [{"changed deps": {"ktpipe/eval": "modified", "data/eval": "deleted"}},
                          {"changed outs": {"metrics/eval/full.json": "deleted"}}],
        "base_model": [{"changed deps": {"params.yaml": {"seed": "modified"}}}, "changed command"],
        "invert@dax": [{"changed deps": {"models/baseline": "modified"}}],
        "finetune@full": [{"changed deps": {"data/inverted": "modified"}}],
    }
    tracked = {"ktpipe/eval/base.py", "params.yaml", "data/inverted/.gitignore"}
    assert stale_entries(status, tracked, {"data/inverted/dax", "models/baseline"}) == [
        "evaluate@full: ktpipe/eval modified", "base_model: params.yaml seed modified", "base_model: changed command"]
