"""Datasets laid out as class folders or listed in a CSV/parquet label file, and the helpers that
every label-file format shares (finding the file, reading it, checking columns and image paths)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from ktpipe.datasets.records import SHOW, Manifest, MaskedImage, build_manifest
from ktpipe.images import IMAGE_SUFFIXES, DatasetError
from ktpipe.params import DatasetParams


def require_key(value: str | None, key: str, fmt: str) -> str:
    """A spec value the format needs; unset is an error pointing at the README."""
    if not value:
        raise DatasetError(f"dataset format {fmt!r} needs '{key}' (see README 'Datasets')")
    return value


def labels_path(spec: DatasetParams) -> Path:
    """The label file, relative to root unless absolute."""
    path = Path(require_key(spec.labels, "labels", spec.format))
    if not path.is_absolute() and spec.root:
        path = Path(spec.root) / path
    if not path.is_file():
        raise DatasetError(f"label file not found: {path}")
    return path


def resolve_paths(base: Path, raw: Sequence[str], source: Path, what: str = "image") -> list[Path]:
    """Paths from a label file, relative to `base`; every one must exist (`what` names them in the error)."""
    paths = [Path(p) if Path(p).is_absolute() else base / p for p in raw]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} {what}(s) listed in {source} not found, first: {missing[:SHOW]}")
    return paths


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted, hidden files skipped."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or parquet label file as strings-or-numbers, with errors that name it."""
    try:
        frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, pa.ArrowException, OSError, ValueError) as err:
        raise DatasetError(f"cannot read label file {path}: {err}") from err
    if frame.empty:
        raise DatasetError(f"label file {path} has no rows")
    return frame


def require_columns(frame: pd.DataFrame, columns: Sequence[str], path: Path) -> None:
    """Every one of `columns` is in the label file, else an error listing what it has."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetError(f"label file {path} lacks column(s) {missing}; it has {list(frame.columns)}")


def class_folder_items(root: Path, folders: Sequence[str]) -> list[tuple[Path, int]]:
    """(image, label) for root/<folder>/ in `folders` order; an empty folder is an error."""
    items: list[tuple[Path, int]] = []
    for label, folder in enumerate(folders):
        images = list_images(root / folder)
        if not images:
            raise DatasetError(f"class folder {root / folder} holds no images ({sorted(IMAGE_SUFFIXES)})")
        items.extend((p, label) for p in images)
    return items


def load_folder(name: str, spec: DatasetParams) -> Manifest:
    """Layout: root/<class>/*.png|jpg|jpeg|bmp|webp|tif|tiff; class names are the folder names
    (sorted), kept exactly as written."""
    root = Path(require_key(spec.root, "root", spec.format))
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"no class folders in {root} (expected {root}/<class>/*.png)")
    return build_manifest(name, classes, class_folder_items(root, classes))


def masked_records(frame: pd.DataFrame, base: Path, path: Path, images: Sequence[Path],
                   labels: Sequence[int]) -> tuple[MaskedImage, ...]:
    """The label file's images with the masks of its 'mask' column, resolved like the images and
    checked as the 'masks' format checks them (binary, the image's size)."""
    from ktpipe.datasets.masks import check_masked_image  # that module builds on this one's helpers

    empty = np.flatnonzero(frame["mask"].isna().to_numpy())
    if len(empty):
        raise DatasetError(f"label file {path}: empty mask in data row(s) {(empty[:SHOW] + 1).tolist()}")
    masks = resolve_paths(base, frame["mask"].astype(str).tolist(), path, what="mask file")
    for image, mask in zip(images, masks):
        check_masked_image(image, mask)
    return tuple(MaskedImage(str(i), str(m), k) for i, m, k in zip(images, masks, labels))


def load_manifest_file(name: str, spec: DatasetParams) -> Manifest:
    """Layout: a CSV or parquet file `labels` (relative to root) with columns path,label;
    labels are class names (sorted to give label order); paths are relative to root
    (or to the label file's folder when root is unset). An optional column mask names each
    image's binary mask (segmentation; placed like path, read by the 'masks' format's rule)."""
    path = labels_path(spec)
    frame = read_table(path)
    require_columns(frame, ("path", "label"), path)
    empty = np.flatnonzero((frame["path"].isna() | frame["label"].isna()).to_numpy())
    if len(empty):
        raise DatasetError(f"label file {path}: empty path or label in data row(s) {(empty[:SHOW] + 1).tolist()}")
    names = frame["label"].astype(str).str.strip()
    classes = sorted(set(names))
    index = {c: k for k, c in enumerate(classes)}
    base = Path(spec.root) if spec.root else path.parent
    paths = resolve_paths(base, frame["path"].astype(str).tolist(), path)
    labels = [index[c] for c in names]
    if "mask" in frame.columns:
        return Manifest(name, tuple(classes), masked_records(frame, base, path, paths, labels))
    return build_manifest(name, classes, list(zip(paths, labels)))
