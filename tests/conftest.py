"""Shared fixtures: a tiny random-init open_clip checkpoint, a tiny project folder, and the real
architectures' random-init checkpoints (tests/archs.py), each built once per session.

Stages are modules of stages/ (`python -m stages.<stage> ...`, as dvc.yaml runs them):
they take their paths as arguments and read `params.yaml` from the working directory, so a
"project" is a folder with a params file and the demo concepts file; tests run a stage in it as a
subprocess, exactly as `dvc repro` would (`run_stage`), or in-process through the same click
group (`run_stage_here`: the same code path and the same result, minus the 3-8 s interpreter
start-up that importing torch and open_clip costs). Test modules import the
plain helpers (`make_project`, `write_params`, `run_stage`, `run_stage_here`) from here; the
fixtures build the shared pieces.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import random
import shutil
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ruamel.yaml import YAML

torch.set_num_threads(1)  # one thread per pytest-xdist worker (pyproject addopts): workers fill the cores

REPO = Path(__file__).resolve().parents[1]
DEMO_CONCEPTS_FILE = REPO / "captions" / "demo.yaml"
DEMO_CONCEPTS = ["blicket", "dax", "wug", "lantern", "clover", "button", "shield", "ember", "halo", "tile", "comet"]
NOVEL = ["blicket", "dax", "wug"]

# A CLIP small enough that a forward pass is milliseconds (16 px images, one layer per tower).
TINY_ARCH: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}

# Stage subprocesses' warm-start servers (ktpipe/warm.py): one folder per test run, shared by the
# xdist workers (they inherit this environment), its servers stopped when the run ends
if "KTPIPE_WARM_DIR" not in os.environ:
    import tempfile

    os.environ["KTPIPE_WARM_DIR"] = OWN_WARM_DIR = tempfile.mkdtemp(prefix="ktpipe-warm-tests-")
else:
    OWN_WARM_DIR = None

# Environment of stage subprocesses: one thread each, no progress bars, no network.
STAGE_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TQDM_DISABLE": "1",
    "HF_HUB_OFFLINE": "1",
    "PYTHONWARNINGS": "ignore",
    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
}


def tiny_params(checkpoint: Path) -> dict[str, Any]:
    """Params for a project on the tiny open_clip checkpoint (every section the repo has)."""
    return {
        "seed": 0,
        "lr": 1.0e-4,
        "model": {"backend": "open_clip", "name": f"local-dir:{checkpoint}", "pretrained": None, "device": "cpu"},
        "world": {"image_size": 16, "val_per_concept": 2, "test_per_concept": 2},
        "pretrain": {"steps": 2, "batch_size": 16, "name_batch": 8, "warmup": 1},
        "concepts": {"names": list(DEMO_CONCEPTS), "file": "captions/demo.yaml"},
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
    shutil.copy(DEMO_CONCEPTS_FILE, folder / "captions" / "demo.yaml")
    with (folder / "params.yaml").open("w") as fh:
        YAML(typ="safe", pure=True).dump(deep_merge(tiny_params(checkpoint), overrides), fh)
    return folder


def run_stage(project: Path, stage: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m stages.<stage> ARGS` (this repo's stages and ktpipe) with the project as working directory."""
    cmd = [sys.executable, "-m", f"stages.{stage}", *map(str, args)]
    return subprocess.run(cmd, cwd=project, env=STAGE_ENV, capture_output=True, text=True, timeout=timeout)


def text_mode(output: str) -> str:
    """Output as `subprocess.run(..., text=True)` returns it: universal newlines ("\\r" -> "\\n")."""
    return output.replace("\r\n", "\n").replace("\r", "\n")


def run_stage_here(project: Path, stage: str, *args: str) -> subprocess.CompletedProcess:
    """`run_stage`, in-process: the `ktpipe` click group runs `<stage> ARGS` with the project as
    working directory and STAGE_ENV's settings, and comes back as a CompletedProcess.

    The same code path as the subprocess minus the interpreter start-up (5-10 s of importing
    torch and open_clip on the test machine). An exit reads as the interpreter reads it
    (SystemExit's code; a message code goes to stderr with status 1) and an uncaught exception
    prints its traceback to stderr with status 1, so `"Traceback" not in stderr` means what it
    means for a subprocess; warnings are ignored (PYTHONWARNINGS=ignore); stdout and stderr read
    as `run_stage` reads them (`text_mode`: a progress bar's "\\r" becomes "\\n"). The working
    directory, argv, environment and the global RNG states are restored afterwards.
    """
    from stages.cli import main

    argv = [stage, *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    returncode = 0
    py_state, np_state = random.getstate(), np.random.get_state()
    with (pytest.MonkeyPatch.context() as patch, torch.random.fork_rng(devices=[]), warnings.catch_warnings(),
          contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
        warnings.simplefilter("ignore")
        patch.chdir(project)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TQDM_DISABLE", "HF_HUB_OFFLINE"):
            patch.setenv(name, STAGE_ENV[name])
        try:
            main.main(args=argv, prog_name="ktpipe")
        except SystemExit as exit_:
            code = exit_.code
            if code is None or isinstance(code, int):
                returncode = code or 0
            else:
                print(code, file=sys.stderr)
                returncode = 1
        except Exception:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            returncode = 1
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
    return subprocess.CompletedProcess([sys.executable, "-m", "stages", *argv], returncode, text_mode(out.getvalue()),
                                       text_mode(err.getvalue()))


def save_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    from ktpipe.models import OpenClipModel

    torch.manual_seed(seed)
    OpenClipModel.from_config(copy.deepcopy(TINY_ARCH)).save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-init tiny CLIP saved as an open_clip local-dir folder (shared, do not modify)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory):
    """arch -> tests/archs.py's random-init checkpoint folder of that architecture at its real input
    size (seed 0), built once per session and shared by every module (do not modify). The folders
    (ViT-L-14's weights are 1.7 GB) are removed when the session ends."""
    from archs import save_random_checkpoint

    root, built = tmp_path_factory.mktemp("archs"), {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = save_random_checkpoint(arch, root / arch)
        return built[arch]

    yield get
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tiny_project(tmp_path, tiny_checkpoint) -> Path:
    """A fresh project folder on the tiny checkpoint; tweak it with `write_params`."""
    return make_project(tmp_path / "project", tiny_checkpoint)


@pytest.fixture
def rendered_project(tiny_project, monkeypatch) -> Path:
    """The tiny project as working directory, with its concepts and its two demo sets (val and test:
    the same classes) rendered, ready for `run_evaluate`."""
    from ktpipe.datasets import run_data
    from ktpipe.describe import run_concepts
    from ktpipe.params import load_params

    monkeypatch.chdir(tiny_project)
    params = load_params("params.yaml")
    run_concepts(Path(params.concepts.file), Path(params.concepts.generated), params.concepts, Path("data/concepts"),
                 world_path=Path("data/world.json"))
    run_data(params, Path("data/eval"), Path("data/world.json"))
    return tiny_project


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt to reach a model hub fails the test."""
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_download)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    """A random-init demo CLIP checkpoint folder (the demo ViLT and CoCa start from one; do not modify)."""
    import torch

    from ktpipe.models import build_demo_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("demo_clip")
    build_demo_model().save(folder)
    return folder


@pytest.fixture(scope="session")
def preset_datasets(tmp_path_factory) -> Path:
    """$KTPIPE_DATASETS of the paper presets: tests/datasets_fixture.py's tiny datasets in every loader's
    real layout, built once per session (do not modify)."""
    from datasets_fixture import build_datasets

    return build_datasets(tmp_path_factory.mktemp("datasets"))


# --- test order ------------------------------------------------------------------------------------

# Seconds a slow test (marker `slow`) of each module takes on one busy core, roughly: the order the
# scheduler should start them in, and how to share them out. The modules in SHARED_STATE keep
# models and figures in per-process caches, so their tests stay together on one worker.
SLOW_SECONDS = {"test_dvc_e2e.py": 480, "test_preset_runs.py": 90, "test_crash_safety.py": 40, "test_presets.py": 20,
                "test_preset_learning.py": 8, "test_preset_learning_vilt.py": 10}
SHARED_STATE = {"test_presets.py", "test_preset_learning.py", "test_preset_learning_vilt.py", "test_crash_safety.py"}


def pytest_collection_modifyitems(config, items):
    """Deal the slow tests, longest first, to the front of each pytest-xdist worker's share.

    `--dist worksteal` hands each worker a contiguous share of the collection and lets an idle worker
    steal from the end of a busy one's queue: with the long tests at the front of every share (each
    group to the share with the least so far), the short ones fill the gaps and no worker starts a
    several-minute test when the others are done."""
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    groups: dict[str, list] = {}
    for item in items:
        if item.get_closest_marker("slow"):
            key = item.path.name if item.path.name in SHARED_STATE else item.nodeid
            groups.setdefault(key, []).append(item)
    cost = {key: sum(SLOW_SECONDS.get(i.path.name, 10) for i in group) for key, group in groups.items()}
    shares, loads = [[] for _ in range(workers)], [0] * workers
    for key in sorted(groups, key=cost.get, reverse=True):  # stable: file order among equals
        k = loads.index(min(loads))
        shares[k] += groups[key]
        loads[k] += cost[key]
    slow = {item for group in groups.values() for item in group}
    rest = [item for item in items if item not in slow]
    per_share = -(-len(items) // workers)  # the scheduler's contiguous share (ceil)
    ordered = []
    for share in shares:
        share.sort(key=lambda item: -SLOW_SECONDS.get(item.path.name, 10))  # the longest single tests first
        take = max(0, per_share - len(share))
        ordered += share + rest[:take]
        rest = rest[take:]
    items[:] = ordered + rest


# --- memory ----------------------------------------------------------------------------------------

RSS_TRIM_MB = 1500  # after a test, a worker holding more than this gives its freed heap back to the system


def resident_mb() -> int:
    """This process's resident memory in MiB (0 where /proc is missing)."""
    try:
        return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) // 1024
    except (OSError, IndexError, ValueError):
        return 0


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Return freed memory to the system after a big test. glibc keeps the freed tensors of a real-size
    model (ViT-L-14, CoCa ViT-L-14: 428M-638M parameters, tensors under its 32 MB mmap threshold) in
    its heap: a worker then holds 6-15 GB it no longer uses, and two such workers beside a stage
    subprocess exhausted 24 GB once (the OOM killer took a worker). `malloc_trim` hands it back."""
    if resident_mb() < RSS_TRIM_MB:
        return
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def pytest_sessionfinish(session, exitstatus):
    """The run's warm-start servers stopped and their folder removed (in the process that made it)."""
    if OWN_WARM_DIR is not None and not hasattr(session.config, "workerinput"):
        from ktpipe.warm import stop_servers

        stop_servers(Path(OWN_WARM_DIR))
        shutil.rmtree(OWN_WARM_DIR, ignore_errors=True)
