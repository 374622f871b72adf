"""The demo's base models, shipped pretrained with their provenance.

Pretraining the demo's tiny CLIP, ViLT and CoCa takes minutes on a CPU, yet gives the same bytes
for the same params and code. So the package ships each one (ktpipe/demo/base_models/<backend>/:
the checkpoint files and `provenance.json`), and the base_model stage copies it when the record
of what would pretrain it now (`pretraining_record`: seed, the pretraining params, the known
concepts, the starting checkpoint, a hash of the pretraining code and data files) equals the
shipped one; any difference pretrains from scratch, named in one line. `ship_base_models`
regenerates them (`ktpipe ship_base_models`); tests/test_shipped.py fails when code or default
params drift from the records.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

from ktpipe.io import atomic_dir, write_json
from ktpipe.params import Params

PACKAGE = Path(str(resources.files("ktpipe")))
SHIPPED = PACKAGE / "demo" / "base_models"
RECORD_FILE = "provenance.json"
# What pretrains each demo backend: the module (its ktpipe imports followed) and the files it reads.
PRETRAINING_CODE = {
    "demo": ("ktpipe.demo.pretrain", ("demo/models.py", "models/openclip.py", "models/configs/ktpipe-demo.json")),
    "demo_vilt": ("ktpipe.demo.pretrain_cross", ("models/configs/ktpipe-demo-vilt.json",)),
    "demo_coca": ("ktpipe.demo.pretrain_caption", ("models/openclip.py", "models/configs/ktpipe-demo-coca.json",
                                              "models/configs/ktpipe-demo.json")),
}
DATA_FILES = ("demo/world.yaml", "data/templates")
NO_NUMERICS = {"params.py", "errors.py", "cli.py"}  # values are recorded, messages change nothing


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_digest(folder: Path) -> str:
    """One hash of every checkpoint file in a folder (names and contents), for a starting checkpoint
    (a shipped folder's provenance record is not part of its checkpoint)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != RECORD_FILE)
    return sha256_bytes("".join(f"{p.relative_to(folder)}:{sha256_bytes(p.read_bytes())}\n" for p in files).encode())


def module_imports(path: Path) -> set[str]:
    """The ktpipe modules a file imports at module level (`import`, `from ... import`)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ktpipe"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("ktpipe"))
    return names


def module_path(name: str) -> Path | None:
    base = PACKAGE.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def code_files(backend: str) -> list[Path]:
    """The pretraining module of `backend`, every ktpipe module it imports (transitively, at module
    level), the backend files it loads lazily, and the data files pretraining reads."""
    module, extra = PRETRAINING_CODE[backend]
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        path = module_path(todo.pop())
        if path is None or str(path) in seen:
            continue
        seen[str(path)] = path
        todo += sorted(module_imports(path))
    files = [p for p in seen.values() if p.name not in NO_NUMERICS]
    files += [PACKAGE / f for f in extra]
    for entry in DATA_FILES:
        files += sorted(p for p in (PACKAGE / entry).rglob("*") if p.is_file()) if (PACKAGE / entry).is_dir() \
            else [PACKAGE / entry]
    return sorted(set(files))


def code_digest(backend: str) -> str:
    """One hash of the pretraining code and data of `backend` (paths relative to the package)."""
    return sha256_bytes("".join(f"{p.relative_to(PACKAGE)}:{sha256_bytes(p.read_bytes())}\n"
                                for p in code_files(backend)).encode())


def pretraining_record(params: Params, world_path: Path | None) -> dict[str, Any]:
    """What determines a demo base model's bytes: the params it is pretrained with, the known
    concepts (world_path, the concepts stage's known.json), its starting checkpoint and its code."""
    pretrain = dataclasses.asdict(params.pretrain)
    init = pretrain.pop("init_from")
    return {
        "backend": params.model.backend, "name": params.model.name, "seed": params.seed,
        "image_size": params.world.image_size, "templates": params.evaluate.templates, "pretrain": pretrain,
        "known": json.loads(Path(world_path).read_text()) if world_path is not None else None,
        "init_from": folder_digest(Path(init)) if init else None,
        "code": code_digest(params.model.backend),
    }


def read_shipped(backend: str) -> dict | None:
    """The shipped record of `backend` (with `folder`), or None when none ships."""
    path = SHIPPED / backend / RECORD_FILE
    if not path.is_file():
        return None
    return {**json.loads(path.read_text()), "folder": str(path.parent)}


def mismatch(shipped: dict | None, record: dict) -> str | None:
    """Why the shipped model is not the one `record` would pretrain (None: it is)."""
    if shipped is None:
        return "none ships"
    differ = [key for key in record if shipped["record"].get(key) != record[key]]
    if "pretrain" in differ:
        differ.remove("pretrain")
        differ += [f"pretrain.{k}" for k in record["pretrain"] if shipped["record"]["pretrain"].get(k) != record["pretrain"][k]]
    return None if not differ else "it differs from the shipped one in " + ", ".join(differ)


def copy_shipped(shipped: dict, out_dir: Path, log_path: Path) -> dict:
    """The shipped checkpoint into out_dir (byte for byte) and its pretraining log to log_path."""
    start = time.time()
    with atomic_dir(out_dir) as tmp:
        for path in Path(shipped["folder"]).iterdir():
            if path.name != RECORD_FILE:
                shutil.copy2(path, tmp / path.name)
    summary = {"seconds": round(time.time() - start, 1), "shipped": True, "pretraining_seconds": shipped["seconds"],
               "torch": shipped["torch"], "final": shipped["log"][-1], "log": shipped["log"]}
    write_json(log_path, summary)
    return summary


def ship_base_models(params: Params, known_path: Path, out_root: Path = SHIPPED) -> list[str]:
    """Pretrain the demo model of `params` and of each of its demo families from scratch and write
    each into out_root/<backend>/ with its provenance record. Families start from the file's model."""
    import torch

    from ktpipe.base_model import DEMO_PRETRAINING, pretrain_demo

    runs = [params] + [params.family(name) for name in params.families]
    runs = [p for p in runs if p.model.backend in DEMO_PRETRAINING]
    shipped = []
    with tempfile.TemporaryDirectory() as tmp:
        made: dict[str, Path] = {}  # out path the params name -> where it was pretrained
        for run in runs:
            init = run.pretrain.init_from
            if init:
                run = dataclasses.replace(run, pretrain=dataclasses.replace(run.pretrain, init_from=str(made[init])))
            folder, log = Path(tmp) / run.model.backend, Path(tmp) / f"{run.model.backend}.json"
            summary = pretrain_demo(run, folder, log, known_path)
            made[str(Path(run.model.pretrained or ""))] = folder
            target = Path(out_root) / run.model.backend
            with atomic_dir(target) as out:
                for path in folder.iterdir():
                    shutil.copy2(path, out / path.name)
                write_json(out / RECORD_FILE, {"record": pretraining_record(run, known_path),
                                                "torch": torch.__version__, "seconds": summary["seconds"],
                                                "log": summary["log"]})
            shipped.append(run.model.backend)
    return shipped
