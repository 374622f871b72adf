"""Images with reference captions (retrieval, captioning): the Karpathy split files of Flickr30k
and MSCOCO, and a generic CSV/parquet file of (path, caption) rows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ktpipe.datasets.folders import labels_path, read_table, require_columns, require_key, resolve_paths
from ktpipe.datasets.records import SHOW, CaptionedImage, Manifest
from ktpipe.images import DatasetError
from ktpipe.params import DatasetParams

def read_karpathy(path: Path) -> list[dict]:
    """The `images` list of a Karpathy split file (`dataset_flickr30k.json`, `dataset_coco.json`)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"cannot read Karpathy split file {path}: {err}") from err
    images = raw.get("images") if isinstance(raw, dict) else None
    if not isinstance(images, list) or not images:
        raise DatasetError(f"Karpathy split file {path} has no 'images' list")
    return images


def karpathy_entry(entry: dict, index: int, path: Path) -> tuple[str, str, tuple[str, ...]]:
    """(split, image path relative to the image root, captions) of one entry; what is missing
    is an error naming the file and the entry."""
    if not isinstance(entry, dict) or not entry.get("filename") or not entry.get("split"):
        raise DatasetError(f"Karpathy split file {path}: image entry {index} lacks 'filename' or 'split'")
    relative = str(Path(entry.get("filepath") or "") / entry["filename"])  # COCO: filepath = val2014/...
    sentences = entry.get("sentences")
    captions = tuple(s["raw"].strip() for s in sentences or [] if isinstance(s, dict) and str(s.get("raw", "")).strip())
    return entry["split"], relative, captions


def load_karpathy(name: str, spec: DatasetParams) -> Manifest:
    """Layout: a Karpathy split file `labels` (relative to root) and the images under root
    (Flickr30k: root/<filename>; MSCOCO: root/<filepath>/<filename>); `split` picks the images
    (test: the Flickr30k 1K and MSCOCO 5K test sets), `sentences[].raw` are the captions."""
    root = Path(require_key(spec.root, "root", spec.format))
    path = labels_path(spec)
    entries = [karpathy_entry(e, i, path) for i, e in enumerate(read_karpathy(path))]
    chosen = [(relative, captions) for split, relative, captions in entries if split == spec.split]
    if not chosen:
        present = sorted({split for split, _, _ in entries})
        raise DatasetError(f"Karpathy split file {path} has no {spec.split!r} split; its splits: {present}")
    uncaptioned = [relative for relative, captions in chosen if not captions]
    if uncaptioned:
        raise DatasetError(f"Karpathy split file {path}: {len(uncaptioned)} {spec.split} image(s) have no "
                           f"captions, first: {uncaptioned[:SHOW]}")
    paths = resolve_paths(root, [relative for relative, _ in chosen], path)
    return Manifest(name, (), tuple(CaptionedImage(str(p), captions) for p, (_, captions) in zip(paths, chosen)))


def load_captions_file(name: str, spec: DatasetParams) -> Manifest:
    """Layout: a CSV or parquet file `labels` (relative to root) with columns path,caption, one row
    per caption; an image's captions keep the file's order, images their first appearance. Paths are
    relative to root (or to the file's folder when root is unset)."""
    path = labels_path(spec)
    frame = read_table(path)
    require_columns(frame, ("path", "caption"), path)
    captions = frame["caption"].astype("string").str.strip()
    empty = np.flatnonzero((frame["path"].isna() | captions.isna() | (captions == "")).to_numpy())
    if len(empty):
        raise DatasetError(f"caption file {path}: empty path or caption in data row(s) {(empty[:SHOW] + 1).tolist()}")
    grouped: dict[str, list[str]] = {}
    for image, caption in zip(frame["path"].astype(str), captions):
        grouped.setdefault(image, []).append(caption)
    base = Path(spec.root) if spec.root else path.parent
    paths = resolve_paths(base, list(grouped), path)
    return Manifest(name, (), tuple(CaptionedImage(str(p), tuple(c)) for p, c in zip(paths, grouped.values())))
