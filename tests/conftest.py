"""Shared fixtures: a tiny random-init open_clip checkpoint and a tiny project folder.

Stage scripts take their paths from argv and read `params.yaml` from the working directory,
so a "project" is a folder with a params file and the demo captions; tests run the scripts
in it as subprocesses, exactly as `dvc repro` would. Test modules import the plain helpers
(`make_project`, `write_params`, `run_stage`) from here; the fixtures build the shared pieces.
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from ruamel.yaml import YAML

torch.set_num_threads(1)  # the test machine has 2 busy cores; 1 thread is faster there

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "stages"
DEMO_CAPTIONS = REPO / "captions" / "demo.yaml"
DEMO_CONCEPTS = ["blicket", "dax", "wug", "lantern", "clover", "button", "shield", "ember", "halo", "tile", "comet"]
NOVEL = ["blicket", "dax", "wug"]

# A CLIP small enough that a forward pass is milliseconds (16 px images, one layer per tower).
TINY_ARCH: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}

# Environment of stage subprocesses: one thread each, no progress bars, no network.
STAGE_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TQDM_DISABLE": "1",
    "HF_HUB_OFFLINE": "1",
    "PYTHONWARNINGS": "ignore",
}


def tiny_params(checkpoint: Path) -> dict[str, Any]:
    """Params for a project on the tiny open_clip checkpoint (every section the repo has)."""
    return {
        "seed": 0,
        "lr": 1.0e-4,
        "concepts": list(DEMO_CONCEPTS),
        "model": {"backend": "open_clip", "name": f"local-dir:{checkpoint}", "pretrained": None, "device": "cpu"},
        "world": {"image_size": 16, "val_per_concept": 2, "test_per_concept": 2},
        "pretrain": {"steps": 2, "batch_size": 16, "name_batch": 8, "warmup": 1},
        "captions": {"file": "captions/demo.yaml"},
        "invert": {"steps": 3, "samples": 2},
        "finetune": {"epochs": 1, "batch_size": 4, "towers": "visual", "rehearsal": False},
        "recipes": {"paper": {"rehearsal": False}, "full": {"rehearsal": True}},
        "evaluate": {"templates": "demo", "batch_size": 32,
                     "sets": {"val": {"format": "demo", "split": "val"}, "test": {"format": "demo", "split": "test"}}},
        "report": {"target_set": "test", "retention_set": "test"},
    }


def deep_merge(base: dict, overrides: dict) -> dict:
    """A copy of `base` with `overrides` merged in, recursively for nested mappings."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_params(project: Path) -> dict[str, Any]:
    return YAML(typ="safe", pure=True).load((Path(project) / "params.yaml").read_text())


def write_params(project: Path, **overrides: Any) -> dict[str, Any]:
    """Deep-merge `overrides` into project/params.yaml (write_params(p, invert={"steps": 5}))."""
    params = deep_merge(read_params(project), overrides)
    with (Path(project) / "params.yaml").open("w") as fh:
        YAML(typ="safe", pure=True).dump(params, fh)
    return params


def make_project(folder: Path, checkpoint: Path, **overrides: Any) -> Path:
    """Lay out params.yaml and captions/demo.yaml in `folder`; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "captions").mkdir(exist_ok=True)
    shutil.copy(DEMO_CAPTIONS, folder / "captions" / "demo.yaml")
    with (folder / "params.yaml").open("w") as fh:
        YAML(typ="safe", pure=True).dump(deep_merge(tiny_params(checkpoint), overrides), fh)
    return folder


def run_stage(project: Path, stage: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run stages/<stage>.py (from the repo) with the project as working directory."""
    cmd = [sys.executable, str(STAGES / f"{stage}.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=project, env=STAGE_ENV, capture_output=True, text=True, timeout=timeout)


def save_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    from ktpipe.models import OpenClipModel

    torch.manual_seed(seed)
    OpenClipModel.from_config(copy.deepcopy(TINY_ARCH)).save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-init tiny CLIP saved as an open_clip local-dir folder (shared, do not modify)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture
def tiny_project(tmp_path, tiny_checkpoint) -> Path:
    """A fresh project folder on the tiny checkpoint; tweak it with `write_params`."""
    return make_project(tmp_path / "project", tiny_checkpoint)


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt to reach a model hub fails the test."""
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_download)
