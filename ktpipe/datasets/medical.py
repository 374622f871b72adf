"""Chest X-ray sets: CheXpert-5x200 (one-hot CSV) and JSRT nodules (clinical text file)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ktpipe.datasets.folders import labels_path, read_table, require_columns, require_key, resolve_paths
from ktpipe.datasets.records import SHOW, Manifest, build_manifest
from ktpipe.images import DatasetError
from ktpipe.params import DatasetParams

CHEXPERT_CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
CHEXPERT_PATH_COLUMNS = ("Path", "imgpath")
JSRT_CLASSES = {"benign": "benign nodule", "malignant": "lung cancer"}  # CLNDAT word -> class name
JSRT_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def chexpert_labels(frame: pd.DataFrame, path: Path) -> list[int]:
    """Index of the single positive (1) class column of each CheXpert-5x200 row."""
    positive = frame[list(CHEXPERT_CLASSES)].apply(pd.to_numeric, errors="coerce").to_numpy() == 1  # (N, 5)
    bad = np.flatnonzero(positive.sum(axis=1) != 1)
    if len(bad):
        row = int(bad[0])
        found = [c for c, on in zip(CHEXPERT_CLASSES, positive[row]) if on]
        raise DatasetError(f"{path} line {row + 2} (data row {row + 1}): expected exactly one positive (1) among "
                           f"{list(CHEXPERT_CLASSES)}, found {found or 'none'}; {len(bad)} such row(s) in all")
    return positive.argmax(axis=1).tolist()


def load_chexpert5x200(name: str, spec: DatasetParams) -> Manifest:
    """Layout: a CSV `labels` (as distributed with MedCLIP / GLoRIA) with an image path column
    (Path or imgpath, relative to root) and one-hot columns Atelectasis, Cardiomegaly,
    Consolidation, Edema, Pleural Effusion (one 1 per row). Class names are lowercase."""
    path = labels_path(spec)
    frame = read_table(path)
    column = next((c for c in CHEXPERT_PATH_COLUMNS if c in frame.columns), None)
    if column is None:
        raise DatasetError(f"label file {path} lacks an image path column {list(CHEXPERT_PATH_COLUMNS)}; "
                           f"it has {list(frame.columns)}")
    require_columns(frame, CHEXPERT_CLASSES, path)
    labels = chexpert_labels(frame, path)
    base = Path(spec.root) if spec.root else path.parent
    paths = resolve_paths(base, frame[column].astype(str).tolist(), path)
    return build_manifest(name, [c.lower() for c in CHEXPERT_CLASSES], list(zip(paths, labels)))


def parse_clndat(path: Path) -> list[tuple[str, str]]:
    """(file stem, 'benign' or 'malignant') per case line of JSRT's CLNDAT_EN.txt."""
    cases = []
    for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        fields = line.split()
        if not fields or line.startswith("#"):
            continue
        found = {f.lower() for f in fields} & set(JSRT_CLASSES)
        if len(found) != 1:
            raise DatasetError(f"{path} line {line_no}: expected the word 'benign' or 'malignant', "
                               f"got {line.strip()!r}")
        cases.append((Path(fields[0]).stem, found.pop()))
    if not cases:
        raise DatasetError(f"no cases in JSRT clinical file {path}")
    return cases


def find_jsrt_image(stem: str, files: dict[str, Path]) -> Path | None:
    """root/<stem>.<suffix> among `files` (lowercased name -> path), first suffix that exists."""
    for suffix in JSRT_SUFFIXES:
        if (found := files.get(f"{stem}{suffix}".lower())) is not None:
            return found
    return None


def load_jsrt(name: str, spec: DatasetParams) -> Manifest:
    """Layout: JSRT nodule cases. `labels` is the clinical file CLNDAT_EN.txt (one case per
    line, first field the file name such as JPCLN001.IMG, with the word benign or malignant);
    images are root/<stem>.png|jpg|jpeg|tif|tiff converted from the 2048x2048 12-bit raw .IMG
    files. Classes: 'benign nodule' (benign), 'lung cancer' (malignant)."""
    root = Path(require_key(spec.root, "root", spec.format))
    if not root.is_dir():
        raise DatasetError(f"JSRT image folder not found: {root}")
    cases = parse_clndat(labels_path(spec))
    files = {p.name.lower(): p for p in root.iterdir() if p.is_file()}
    images = [find_jsrt_image(stem, files) for stem, _ in cases]
    missing = [stem for (stem, _), image in zip(cases, images) if image is None]
    if missing:
        raw = any(f"{s}.img".lower() in files for s in missing)
        hint = " (only raw .IMG files found: convert them to PNG first)" if raw else ""
        raise DatasetError(f"{len(missing)} JSRT image(s) not found in {root} as <stem>{'|'.join(JSRT_SUFFIXES)}, "
                           f"first: {missing[:SHOW]}{hint}")
    order = list(JSRT_CLASSES)
    items = [(image, order.index(word)) for image, (_, word) in zip(images, cases)]
    return build_manifest(name, list(JSRT_CLASSES.values()), items)
