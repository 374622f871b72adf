"""Evaluation datasets as manifests: (image path, label) lists with class names in label order.

`load_dataset` dispatches on `DatasetParams.format` through `FORMATS`, then applies the
spec's class filter and deterministic class-balanced subset. Every problem with a dataset
raises `DatasetError` naming the path, column, row or class at fault. Class lists (ImageNet
wnids and OpenAI class names, the ImageNet-100 wnids) are package data in ktpipe/data/imagenet/.
"""
from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ktpipe.images import IMAGE_SUFFIXES, DatasetError
from ktpipe.params import DatasetParams

CHEXPERT_CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
CHEXPERT_PATH_COLUMNS = ("Path", "imgpath")
JSRT_CLASSES = {"benign": "benign nodule", "malignant": "lung cancer"}  # CLNDAT word -> class name
JSRT_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
CLASSES_KEY = b"ktpipe.classes"  # parquet schema metadata: JSON list of class names
NAME_KEY = b"ktpipe.name"
SHOW = 5  # how many missing items an error message lists


@dataclass(frozen=True)
class Manifest:
    name: str
    classes: tuple[str, ...]  # class names in label order
    paths: tuple[str, ...]  # image paths, absolute or relative to where the manifest is used
    labels: tuple[int, ...]  # index into `classes`, one per path

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise DatasetError(f"manifest {self.name!r}: {len(self.paths)} paths but {len(self.labels)} labels")
        bad = [k for k in self.labels if not 0 <= k < len(self.classes)]
        if bad:
            raise DatasetError(f"manifest {self.name!r}: labels {bad[:SHOW]} outside 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self) -> dict[str, int]:
        """Images per class, in label order (duplicate class names are summed)."""
        counts = dict.fromkeys(self.classes, 0)
        for k in self.labels:
            counts[self.classes[k]] += 1
        return counts

    def select(self, indices: Sequence[int]) -> Manifest:
        """The images at `indices`, in that order, with the same classes."""
        return Manifest(self.name, self.classes, tuple(self.paths[i] for i in indices),
                        tuple(self.labels[i] for i in indices))


def build_manifest(name: str, classes: Sequence[str], items: Sequence[tuple[Path | str, int]]) -> Manifest:
    """A manifest from (path, label) pairs."""
    return Manifest(name, tuple(classes), tuple(str(p) for p, _ in items), tuple(int(k) for _, k in items))


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


def require(value: str | None, key: str, fmt: str) -> str:
    if not value:
        raise DatasetError(f"dataset format {fmt!r} needs '{key}' (see README 'Datasets')")
    return value


def labels_path(spec: DatasetParams) -> Path:
    """The label file, relative to root unless absolute."""
    path = Path(require(spec.labels, "labels", spec.format))
    if not path.is_absolute() and spec.root:
        path = Path(spec.root) / path
    if not path.is_file():
        raise DatasetError(f"label file not found: {path}")
    return path


def resolve_paths(base: Path, raw: Sequence[str], source: Path) -> list[Path]:
    """Paths from a label file, relative to `base`; every one must exist."""
    paths = [Path(p) if Path(p).is_absolute() else base / p for p in raw]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} image(s) listed in {source} not found, first: {missing[:SHOW]}")
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
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetError(f"label file {path} lacks column(s) {missing}; it has {list(frame.columns)}")


def load_folder(name: str, spec: DatasetParams) -> Manifest:
    """Layout: root/<class>/*.png|jpg|jpeg|bmp|webp|tif|tiff; class names are the folder names
    (sorted), kept exactly as written."""
    root = Path(require(spec.root, "root", spec.format))
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"no class folders in {root} (expected {root}/<class>/*.png)")
    return build_manifest(name, classes, class_folder_items(root, classes))


def class_folder_items(root: Path, folders: Sequence[str]) -> list[tuple[Path, int]]:
    """(image, label) for root/<folder>/ in `folders` order; an empty folder is an error."""
    items: list[tuple[Path, int]] = []
    for label, folder in enumerate(folders):
        images = list_images(root / folder)
        if not images:
            raise DatasetError(f"class folder {root / folder} holds no images ({sorted(IMAGE_SUFFIXES)})")
        items.extend((p, label) for p in images)
    return items


def load_manifest_file(name: str, spec: DatasetParams) -> Manifest:
    """Layout: a CSV or parquet file `labels` (relative to root) with columns path,label;
    labels are class names (sorted to give label order); paths are relative to root
    (or to the label file's folder when root is unset)."""
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
    return build_manifest(name, classes, [(p, index[c]) for p, c in zip(paths, names)])


def imagenet_val_dir(root: Path, wnids: Sequence[str]) -> Path:
    """root itself when it holds wnid folders, else root/val."""
    if not root.is_dir():
        raise DatasetError(f"ImageNet folder not found: {root}")
    if not (root / wnids[0]).is_dir() and (root / "val").is_dir():
        return root / "val"
    return root


def check_wnid_folders(folder: Path, wnids: Sequence[str]) -> None:
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
    root = Path(require(spec.root, "root", spec.format))
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
    root = Path(require(spec.root, "root", spec.format))
    if (root / "val.X").is_dir():
        return wnid_manifest(name, root / "val.X", kaggle_wnids(root))
    return wnid_manifest(name, imagenet_val_dir(root, imagenet100_wnids()), imagenet100_wnids())


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
    root = Path(require(spec.root, "root", spec.format))
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


def load_demo(name: str, spec: DatasetParams) -> Manifest:
    raise DatasetError(f"set {name!r}: the demo format is rendered by the data stage (ktpipe.evalsets), "
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
}


def normalize_class(name: str) -> str:
    """Class names compare case-insensitively, with '_' and '-' as spaces."""
    return " ".join(re.split(r"[\s_-]+", name.strip().lower()))


def filter_classes(manifest: Manifest, keep: Sequence[str]) -> Manifest:
    """Only the classes named in `keep` (all classes of a duplicated name), in dataset label order."""
    available = {normalize_class(c) for c in manifest.classes}
    unknown = [c for c in keep if normalize_class(c) not in available]
    if unknown:
        listed = ", ".join(manifest.classes[:30]) + (" ..." if len(manifest.classes) > 30 else "")
        raise DatasetError(f"set {manifest.name!r} has no class(es) {unknown}; "
                           f"its {len(manifest.classes)} classes: {listed}")
    wanted = {normalize_class(c) for c in keep}
    old = [k for k, c in enumerate(manifest.classes) if normalize_class(c) in wanted]
    remap = {k: new for new, k in enumerate(old)}
    indices = [i for i, k in enumerate(manifest.labels) if k in remap]
    return Manifest(manifest.name, tuple(manifest.classes[k] for k in old),
                    tuple(manifest.paths[i] for i in indices), tuple(remap[manifest.labels[i]] for i in indices))


def class_order(manifest: Manifest, label: int, seed: int) -> list[int]:
    """Image indices of one class, shuffled by a generator seeded with seed and the class name."""
    indices = [i for i, k in enumerate(manifest.labels) if k == label]
    key = zlib.crc32(manifest.classes[label].encode())
    rng = np.random.default_rng([seed, key])
    return [indices[j] for j in rng.permutation(len(indices))]


def take_subset(manifest: Manifest, size: int, seed: int) -> Manifest:
    """A deterministic class-balanced subset: round-robin over per-class seeded shuffles.

    The same seed gives the same subset, and a larger subset contains every smaller one.
    Images keep their original order."""
    if size >= len(manifest):
        return manifest
    queues = [class_order(manifest, k, seed) for k in range(len(manifest.classes))]
    chosen: list[int] = []
    for round_ in range(max(map(len, queues), default=0)):
        chosen.extend(q[round_] for q in queues if round_ < len(q))
        if len(chosen) >= size:
            break
    return manifest.select(sorted(chosen[:size]))


def load_dataset(name: str, spec: DatasetParams, seed: int) -> Manifest:
    """The manifest of one evaluation set: load by format, filter classes, draw the subset."""
    loader = FORMATS.get(spec.format)
    if loader is None:
        raise DatasetError(f"set {name!r}: unknown dataset format {spec.format!r}; known: {sorted(FORMATS)}")
    manifest = loader(name, spec)
    if spec.classes:
        manifest = filter_classes(manifest, spec.classes)
    if spec.subset is not None:
        if spec.subset < 1:
            raise DatasetError(f"set {name!r}: subset must be a positive number of images, got {spec.subset}")
        manifest = take_subset(manifest, spec.subset, seed)
    if not len(manifest):
        raise DatasetError(f"set {name!r} ({spec.format}) has no images after filtering")
    return manifest


def write_manifest(manifest: Manifest, path: Path) -> None:
    """Parquet with columns path, label, class; the class list (label order) in the metadata."""
    table = pa.table({"path": list(manifest.paths), "label": list(manifest.labels),
                      "class": [manifest.classes[k] for k in manifest.labels]})
    meta = {CLASSES_KEY: json.dumps(list(manifest.classes)).encode(), NAME_KEY: manifest.name.encode()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(meta), path)


def read_manifest(path: Path) -> Manifest:
    """A manifest written by `write_manifest`; errors name a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(f"cannot read manifest {path}: {err}") from err
    missing = [c for c in ("path", "label", "class") if c not in table.column_names]
    if missing:
        raise DatasetError(f"manifest {path} lacks column(s) {missing}; it has {table.column_names}")
    meta = table.schema.metadata or {}
    if CLASSES_KEY not in meta:
        raise DatasetError(f"manifest {path} has no class list in its metadata (write it with write_manifest)")
    frame = table.to_pandas()
    name = meta.get(NAME_KEY, path.stem.encode()).decode()
    return Manifest(name, tuple(json.loads(meta[CLASSES_KEY])), tuple(frame["path"].astype(str)),
                    tuple(int(k) for k in frame["label"]))
