"""Evaluation sets: resolve every `evaluate.sets` entry to a manifest (path, label) on disk.

The data stage writes `<out>/<set>.parquet` per set plus `sets.json` (classes and counts), so
evaluation reads one small file per set instead of walking dataset folders again, and a
subset drawn for quick sweeps is fixed once for every experiment that shares it. Demo sets are
rendered into `<out>/<set>/` and listed with paths relative to `<out>`.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from ktpipe.datasets import Manifest, load_dataset, read_manifest, write_manifest
from ktpipe.images import DatasetError
from ktpipe.io import atomic_dir, write_json
from ktpipe.params import DatasetParams, Params
from ktpipe.world import World, load_demo_world, load_world, write_split

SETS_FILE = "sets.json"
DEMO_SEED_OFFSET = {"val": 10_000, "test": 20_000}  # disjoint render streams per split


def expand_path(raw: str, key: str) -> str:
    """Expand '~' and $VARS in a dataset path; an unset variable is an error that names it."""
    expanded = os.path.expanduser(os.path.expandvars(raw))
    unset = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if unset:
        raise DatasetError(f"params key '{key}' uses environment variable(s) {unset} that are not set: {raw!r}")
    return expanded


def resolve_spec(name: str, spec: DatasetParams) -> DatasetParams:
    """The spec with '~' and $VARS expanded and root made absolute, so manifests point at the
    dataset wherever they are read from (a relative label file stays relative to root)."""
    key = f"evaluate.sets.{name}"
    root = os.path.abspath(expand_path(spec.root, f"{key}.root")) if spec.root else None
    labels = expand_path(spec.labels, f"{key}.labels") if spec.labels else None  # relative to root
    return dataclasses.replace(spec, root=root, labels=labels)


def render_demo_set(name: str, spec: DatasetParams, params: Params, out_dir: Path, world: World) -> Manifest:
    """Render a demo-world split into out_dir/<name>/ and list it relative to out_dir."""
    if not world.concepts:
        raise DatasetError(f"evaluation set {name!r} renders the demo world, but no concept of the captions file "
                           "has a 'render' entry (shape, color, fill) to draw")
    n = params.world.val_per_concept if spec.split == "val" else params.world.test_per_concept
    seed = DEMO_SEED_OFFSET[spec.split] + params.seed
    write_split(world, out_dir / name, n, seed, params.world.image_size)
    folder_spec = dataclasses.replace(spec, format="folder", root=str(out_dir / name))
    manifest = load_dataset(name, folder_spec, params.seed)
    paths = tuple(str(Path(p).relative_to(out_dir)) for p in manifest.paths)
    return dataclasses.replace(manifest, paths=paths)


def build_set(name: str, spec: DatasetParams, params: Params, out_dir: Path, world: World | None = None) -> Manifest:
    """One evaluation set's manifest (rendering `world` first for the demo format)."""
    if spec.format == "demo":
        return render_demo_set(name, spec, params, out_dir, world or load_world())
    return load_dataset(name, resolve_spec(name, spec), params.seed)


def run_data(params: Params, out_dir: Path, world_path: Path | None = None) -> dict[str, dict]:
    """Write one manifest per evaluation set and a summary; all or nothing.

    Demo sets draw the concepts of `world_path` (written by the captions stage)."""
    if not params.evaluate.sets:
        raise DatasetError("params 'evaluate.sets' is empty: name at least one evaluation set")
    renders = any(spec.format == "demo" for spec in params.evaluate.sets.values())
    world = load_demo_world(world_path) if renders and world_path is not None else None
    summary = {}
    with atomic_dir(out_dir) as tmp:
        for name, spec in params.evaluate.sets.items():
            manifest = build_set(name, spec, params, tmp, world)
            write_manifest(manifest, tmp / f"{name}.parquet")
            counts = [manifest.labels.count(k) for k in range(len(manifest.classes))]
            summary[name] = {"format": spec.format, "n_images": len(manifest), "classes": list(manifest.classes),
                             "per_class": dict(zip(manifest.classes, counts))}
        write_json(tmp / SETS_FILE, summary)
    return summary


def load_eval_set(eval_dir: Path, name: str) -> Manifest:
    """A set written by `run_data`, with relative (demo) paths resolved against eval_dir."""
    path = Path(eval_dir) / f"{name}.parquet"
    if not path.is_file():
        raise DatasetError(f"evaluation set {name!r} not found at {path}; run the data stage (dvc repro data)")
    manifest = read_manifest(path)
    paths = tuple(p if Path(p).is_absolute() else str(Path(eval_dir) / p) for p in manifest.paths)
    return dataclasses.replace(manifest, paths=paths)
