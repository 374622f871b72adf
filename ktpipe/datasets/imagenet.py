"""ImageNet-1k and ImageNet-100 validation sets in wnid folders.

Class lists (the 1000 wnids, OpenAI's CLIP class names, the ImageNet-100 wnids) are package
data in ktpipe/data/imagenet/, each file opening with a comment that names its source.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ktpipe.datasets.folders import class_folder_items, require_key
from ktpipe.datasets.records import SHOW, Manifest, build_manifest
from ktpipe.images import DatasetError
from ktpipe.params import DatasetParams


def read_data_lines(*parts: str) -> tuple[str, ...]:
    """Non-empty lines of a package data file under ktpipe/data/, '#' comment lines dropped."""
    text = resources.files("ktpipe").joinpath("data", *parts).read_text()
    return tuple(s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#"))


@lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in sorted order, which is the class index order."""
    return read_data_lines("imagenet", "wnids.txt")


@lru_cache(maxsize=None)
def imagenet_classnames() -> tuple[str, ...]:
    """OpenAI's CLIP class names for ImageNet-1k, aligned with `imagenet_wnids`."""
    return read_data_lines("imagenet", "classnames.txt")


@lru_cache(maxsize=None)
def imagenet100_wnids() -> tuple[str, ...]:
    """The 100 wnids of ImageNet-100 (CMC's list, in its file order)."""
    return read_data_lines("imagenet", "imagenet100.txt")


def imagenet_val_dir(root: Path, wnids: Sequence[str]) -> Path:
    """root itself when it holds wnid folders, else root/val."""
    if not root.is_dir():
        raise DatasetError(f"ImageNet folder not found: {root}")
    if not (root / wnids[0]).is_dir() and (root / "val").is_dir():
        return root / "val"
    return root


def check_wnid_folders(folder: Path, wnids: Sequence[str]) -> None:
    """Every wnid has a folder; flat validation images get a hint on sorting them."""
    missing = [w for w in wnids if not (folder / w).is_dir()]
    if not missing:
        return
    hint = ""
    if any(folder.glob("ILSVRC2012_val_*.JPEG")):
        hint = " (the images are flat: sort them into wnid folders first, e.g. with the common valprep.sh)"
    raise DatasetError(f"{len(missing)} of {len(wnids)} wnid folders missing under {folder}, "
                       f"first: {missing[:SHOW]}{hint}")


def wnid_manifest(name: str, folder: Path, wnids: Sequence[str]) -> Manifest:
    """Images of folder/<wnid>/ for the given wnids, labelled in sorted wnid order, OpenAI names."""
    wnids = sorted(wnids)
    check_wnid_folders(folder, wnids)
    names = dict(zip(imagenet_wnids(), imagenet_classnames()))
    return build_manifest(name, [names[w] for w in wnids], class_folder_items(folder, wnids))


def load_imagenet(name: str, spec: DatasetParams) -> Manifest:
    """Layout: ImageNet-1k validation sorted into class folders, root/<wnid>/*.JPEG for all 1000
    wnids (root may also be their parent holding val/). Labels follow the sorted wnids; class
    names are OpenAI's CLIP names (ktpipe/data/imagenet/classnames.txt)."""
    root = Path(require_key(spec.root, "root", spec.format))
    return wnid_manifest(name, imagenet_val_dir(root, imagenet_wnids()), imagenet_wnids())


def kaggle_wnids(root: Path) -> tuple[str, ...]:
    """The wnids of a Kaggle ImageNet-100 copy: its Labels.json keys, else the shipped list."""
    path = root / "Labels.json"
    if not path.is_file():
        return imagenet100_wnids()
    try:
        wnids = tuple(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise DatasetError(f"cannot read {path} (expected a JSON object wnid -> names): {err}") from err
    unknown = sorted(set(wnids) - set(imagenet_wnids()))
    if unknown or not wnids:
        raise DatasetError(f"{path}: keys must be ImageNet-1k wnids; unknown: {unknown[:SHOW]}")
    return wnids


def load_imagenet100(name: str, spec: DatasetParams) -> Manifest:
    """Layout: either the Kaggle copy (ambityga/imagenet100), root/val.X/<wnid>/*.JPEG with the
    class list from root/Labels.json when present, or an ImageNet-1k validation folder
    (as for 'imagenet') filtered to the 100 wnids of ktpipe/data/imagenet/imagenet100.txt."""
    root = Path(require_key(spec.root, "root", spec.format))
    if (root / "val.X").is_dir():
        return wnid_manifest(name, root / "val.X", kaggle_wnids(root))
    return wnid_manifest(name, imagenet_val_dir(root, imagenet100_wnids()), imagenet100_wnids())
