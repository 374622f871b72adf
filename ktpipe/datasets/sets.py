"""Evaluation sets: resolve every `evaluate.sets` entry to a manifest on disk.

`load_dataset` dispatches on `DatasetParams.format` through `FORMATS`, then applies the spec's
class filter and deterministic class-balanced subset. The data stage (`run_data`) writes
`<out>/<set>.parquet` per set plus `sets.json` (kind, classes and counts), so evaluation reads
one small file per set instead of walking dataset folders again, and a subset drawn for quick
sweeps is fixed once for every experiment that shares it. Demo sets are rendered into
`<out>/<set>/` and listed with paths relative to `<out>`.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ktpipe.datasets.captions import load_captions_file, load_karpathy
from ktpipe.datasets.folders import load_folder, load_manifest_file
from ktpipe.datasets.imagenet import load_imagenet, load_imagenet100
from ktpipe.datasets.masks import load_mask_folder
from ktpipe.datasets.medical import load_chexpert5x200, load_jsrt
from ktpipe.datasets.records import CaptionedImage, Manifest, read_manifest, write_manifest
from ktpipe.datasets.selection import filter_classes, take_subset
from ktpipe.images import DatasetError
from ktpipe.io import atomic_dir, write_json
from ktpipe.params import DatasetParams, Params

if TYPE_CHECKING:  # ktpipe.demo.world imports torch; it is imported only where demo sets are rendered
    from ktpipe.demo.world import World

SETS_FILE = "sets.json"
DEMO_SEED_OFFSET = {"val": 10_000, "test": 20_000}  # disjoint render streams per split
CAPTIONED_TASKS = ("retrieval", "captioning")  # tasks whose demo sets are captioned renders


def load_demo(name: str, spec: DatasetParams) -> Manifest:
    """Refuse: demo sets exist only once the data stage has rendered them."""
    raise DatasetError(f"set {name!r}: the demo format is rendered by the data stage (ktpipe.datasets.sets), "
                       "which then lists it as a folder; load_dataset cannot read it directly")


Loader = Callable[[str, DatasetParams], Manifest]
FORMATS: dict[str, Loader] = {
    "demo": load_demo,
    "folder": load_folder,
    "manifest": load_manifest_file,
    "imagenet": load_imagenet,
    "imagenet100": load_imagenet100,
    "chexpert5x200": load_chexpert5x200,
    "jsrt": load_jsrt,
    "karpathy": load_karpathy,
    "captions": load_captions_file,
    "masks": load_mask_folder,
}


def load_dataset(name: str, spec: DatasetParams, seed: int) -> Manifest:
    """The manifest of one evaluation set: load by format, filter classes, draw the subset."""
    loader = FORMATS.get(spec.format)
    if loader is None:
        raise DatasetError(f"set {name!r}: unknown dataset format {spec.format!r}; known: {sorted(FORMATS)}")
    manifest = loader(name, spec)
    if spec.classes and not manifest.has_labels:
        raise DatasetError(f"set {name!r} ({spec.format}) holds captioned images, which have no classes to keep; "
                           f"remove 'classes' from evaluate.sets.{name}")
    if spec.classes:
        manifest = filter_classes(manifest, spec.classes)
    if spec.subset is not None:
        if spec.subset < 1:
            raise DatasetError(f"set {name!r}: subset must be a positive number of images, got {spec.subset}")
        manifest = take_subset(manifest, spec.subset, seed)
    if not len(manifest):
        raise DatasetError(f"set {name!r} ({spec.format}) has no images after filtering")
    return manifest


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
    """Render a demo-world split into out_dir/<name>/ and list it relative to out_dir: labelled by
    concept, or (for a task that reads captions) captioned with the concept's name and the
    background ('a blicket on a gray background.'; captioning sets also without the background),
    or (segmentation) with each object's ground-truth mask."""
    from ktpipe.demo.world import caption_references, caption_render, write_split

    if not world.concepts:
        raise DatasetError(f"evaluation set {name!r} renders the demo world, but no concept of the concepts file "
                           "has a 'render' entry (shape, color, fill) to draw")
    n = params.world.val_per_concept if spec.split == "val" else params.world.test_per_concept
    seed = DEMO_SEED_OFFSET[spec.split] + params.seed
    captioned = spec.task in CAPTIONED_TASKS
    masked = spec.task == "segmentation"  # renders in images/, each object's mask in masks/ (the `masks` layout)
    if (captioned or masked) and spec.subset is not None:  # a subset: as many renders of each concept in turn
        n = min(n, -(-spec.subset // len(world.concepts)))
    shown = write_split(world, out_dir / name, n, seed, params.world.image_size, masks=masked)
    if captioned:
        references = caption_references if spec.task == "captioning" else caption_render
        records = [(i, CaptionedImage(f"{name}/{concept}/{i:04d}.png", references(concept, a)))
                   for concept, attrs in shown.items() for i, a in enumerate(attrs)]
        if spec.subset is not None:
            records = sorted(records, key=lambda r: r[0])[:spec.subset]  # round by round over the concepts
        return Manifest(name, (), tuple(r for _, r in records))
    folder_spec = dataclasses.replace(spec, format="masks" if masked else "folder", root=str(out_dir / name))
    manifest = load_dataset(name, folder_spec, params.seed)
    return manifest.map_paths(lambda p: str(Path(p).relative_to(out_dir)))


def build_set(name: str, spec: DatasetParams, params: Params, out_dir: Path, world: World | None = None) -> Manifest:
    """One evaluation set's manifest (rendering `world` first for the demo format)."""
    if spec.format == "demo":
        from ktpipe.demo.world import load_world

        return render_demo_set(name, spec, params, out_dir, world or load_world())
    return load_dataset(name, resolve_spec(name, spec), params.seed)


def summarize_set(manifest: Manifest, spec: DatasetParams) -> dict:
    """A set's line in sets.json: format, record kind, size, classes and images per class."""
    summary = {"format": spec.format, "kind": manifest.kind, "n_images": len(manifest),
               "classes": list(manifest.classes)}
    if manifest.has_labels:
        summary["per_class"] = manifest.class_counts()
    return summary


def run_data(params: Params, out_dir: Path, world_path: Path | None = None) -> dict[str, dict]:
    """Write one manifest per evaluation set and a summary; all or nothing.

    The sets are those of `evaluate.sets` and of every model family's (`families.<name>.evaluate.sets`).
    Demo sets draw the concepts of `world_path` (written by the concepts stage)."""
    sets = params.evaluated_sets()
    if not sets:
        raise DatasetError("params 'evaluate.sets' is empty: name at least one evaluation set")
    renders = any(spec.format == "demo" for spec in sets.values())
    world = None
    if renders and world_path is not None:
        from ktpipe.demo.world import load_demo_world

        world = load_demo_world(world_path)
    summary = {}
    with atomic_dir(out_dir) as tmp:
        for name, spec in sets.items():
            manifest = build_set(name, spec, params, tmp, world)
            write_manifest(manifest, tmp / f"{name}.parquet")
            summary[name] = summarize_set(manifest, spec)
        write_json(tmp / SETS_FILE, summary)
    return summary


def load_eval_set(eval_dir: Path, name: str) -> Manifest:
    """A set written by `run_data`, with relative (demo) image and mask paths resolved against eval_dir."""
    path = Path(eval_dir) / f"{name}.parquet"
    if not path.is_file():
        raise DatasetError(f"evaluation set {name!r} not found at {path}; run the data stage (dvc repro data)")
    return read_manifest(path).map_paths(lambda p: p if Path(p).is_absolute() else str(Path(eval_dir) / p))
