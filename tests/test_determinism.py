"""The same params and seed give the same bytes on one machine: two projects with identical params
run captions -> data -> invert -> finetune -> evaluate (the stage commands, in-process, the
inversion store off so both compute), with the global random state disturbed between them; every
inverted tensor, every checkpoint file and every evaluation result must be bit-identical, and a
different seed must change them (so the comparison can fail). docs/install.md ("Determinism")
says what differs across machines and why.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from conftest import make_project, run_stage_here, write_params

CONCEPTS = ["blicket", "dax", "lantern"]
WALL_TIMES = {"seconds", "images_per_second"}  # the only fields a rerun may change


def run_pipeline(project: Path) -> None:
    commands = [
        ("captions", "captions/demo.yaml", "captions/generated.yaml", "data/concepts", "data/world.json", "data/known.json"),
        ("data", "data/world.json", "data/eval"),
        ("invert", "data/concepts", "data/inverted", "--store", ""),
        ("finetune", "paper", "data/concepts", "data/inverted", "models/paper", "metrics/finetune/paper.json"),
        ("evaluate", "paper", "models/paper", "data/eval", "data/concepts", "metrics/eval/paper.json"),
    ]
    for args in commands:
        result = run_stage_here(project, *args)
        assert result.returncode == 0, f"{args[0]}: {result.stderr}"


def without_wall_times(data):
    if isinstance(data, dict):
        return {k: without_wall_times(v) for k, v in data.items() if k not in WALL_TIMES}
    if isinstance(data, list):
        return [without_wall_times(v) for v in data]
    return data


def outputs(project: Path) -> dict[str, bytes | object]:
    """Every file of the inversions and the checkpoint, by bytes; the JSON results without wall times."""
    found: dict[str, bytes | object] = {}
    for folder in ("data/inverted", "models/paper", "metrics/eval/paper"):
        for path in sorted((project / folder).rglob("*")):
            if path.is_file():
                found[str(path.relative_to(project))] = path.read_bytes()
    for name in ("metrics/eval/paper.json", "metrics/finetune/paper.json"):
        found[name] = without_wall_times(json.loads((project / name).read_text()))
    return found


def test_same_params_and_seed_give_the_same_bytes(tmp_path, tiny_checkpoint):
    runs = []
    for k, seed in enumerate((0, 0, 1)):
        project = make_project(tmp_path / f"run{k}", tiny_checkpoint)
        write_params(project, seed=seed, concepts={"names": CONCEPTS},
                     recipes={"paper": {"rehearsal": False, "concepts": ["blicket", "dax"]}})
        torch.manual_seed(1000 + k)  # a different global state before each run: the stages seed their own
        random.seed(1000 + k)
        np.random.seed(1000 + k)
        run_pipeline(project)
        runs.append(outputs(project))
    first, again, other_seed = runs
    assert any(name.endswith("images.safetensors") for name in first)
    assert any(name.startswith("models/paper") and name.endswith(".safetensors") for name in first)
    assert set(again) == set(first)
    different = [name for name in first if again[name] != first[name]]
    assert not different, f"not bit-identical on a rerun: {different}"
    changed = {name for name in first if other_seed.get(name) != first[name]}
    assert {"data/inverted/blicket/images.safetensors", "metrics/finetune/paper.json"} <= changed, sorted(changed)
