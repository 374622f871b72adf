"""Typed evaluation records and the manifest that lists them, stored as parquet.

A manifest holds one kind of record: labelled images (classification), images with reference
captions (retrieval, captioning) or images with a binary mask of the class prompted
(segmentation). Its parquet file keeps the class list, name and kind in the schema metadata, so
evaluation reads one small file per set and knows which task applies.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ktpipe.images import DatasetError

CLASSES_KEY = b"ktpipe.classes"  # parquet schema metadata: JSON list of class names
NAME_KEY = b"ktpipe.name"
KIND_KEY = b"ktpipe.kind"  # one of SCHEMAS' keys
SHOW = 5  # how many offending items an error message lists


@dataclass(frozen=True)
class LabeledImage:
    """An image of one class (classification)."""

    path: str  # image path, absolute or relative to where the manifest is used
    label: int  # index into the manifest's classes

    def map_paths(self, rewrite: Callable[[str], str]) -> LabeledImage:
        """This record with its file path rewritten."""
        return dataclasses.replace(self, path=rewrite(self.path))

    def to_row(self, classes: Sequence[str]) -> dict:
        """The record's parquet row ('class' names the label for people reading the file)."""
        return {"path": self.path, "label": self.label, "class": classes[self.label]}

    @classmethod
    def from_row(cls, row: dict) -> LabeledImage:
        """The record of a parquet row written by `to_row`."""
        return cls(row["path"], row["label"])


@dataclass(frozen=True)
class CaptionedImage:
    """An image with its reference captions (retrieval, captioning)."""

    path: str  # image path, absolute or relative to where the manifest is used
    captions: tuple[str, ...]  # reference captions, in source order

    def map_paths(self, rewrite: Callable[[str], str]) -> CaptionedImage:
        """This record with its file path rewritten."""
        return dataclasses.replace(self, path=rewrite(self.path))

    def to_row(self, classes: Sequence[str]) -> dict:
        """The record's parquet row."""
        return {"path": self.path, "captions": list(self.captions)}

    @classmethod
    def from_row(cls, row: dict) -> CaptionedImage:
        """The record of a parquet row written by `to_row`."""
        return cls(row["path"], tuple(row["captions"]))


@dataclass(frozen=True)
class MaskedImage:
    """An image with a binary mask of one class (segmentation)."""

    path: str  # image path, absolute or relative to where the manifest is used
    mask: str  # binary mask file of the same size, nonzero where the class is; placed like `path`
    label: int  # index into the manifest's classes: the class prompted

    def map_paths(self, rewrite: Callable[[str], str]) -> MaskedImage:
        """This record with its image and mask paths rewritten."""
        return dataclasses.replace(self, path=rewrite(self.path), mask=rewrite(self.mask))

    def to_row(self, classes: Sequence[str]) -> dict:
        """The record's parquet row ('class' names the label for people reading the file)."""
        return {"path": self.path, "mask": self.mask, "label": self.label, "class": classes[self.label]}

    @classmethod
    def from_row(cls, row: dict) -> MaskedImage:
        """The record of a parquet row written by `to_row`."""
        return cls(row["path"], row["mask"], row["label"])


Record = LabeledImage | CaptionedImage | MaskedImage
KINDS: dict[type, str] = {LabeledImage: "labeled", CaptionedImage: "captioned", MaskedImage: "masked"}
RECORD_TYPES: dict[str, type] = {kind: record_type for record_type, kind in KINDS.items()}
LABELED_TYPES = (LabeledImage, MaskedImage)  # records that carry a class label
SCHEMAS = {  # parquet columns per kind, as `to_row` fills them
    "labeled": pa.schema([("path", pa.string()), ("label", pa.int64()), ("class", pa.string())]),
    "captioned": pa.schema([("path", pa.string()), ("captions", pa.list_(pa.string()))]),
    "masked": pa.schema([("path", pa.string()), ("mask", pa.string()), ("label", pa.int64()),
                         ("class", pa.string())]),
}


def is_text(kind: pa.DataType) -> bool:
    """Whether an arrow type holds strings."""
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def is_text_list(kind: pa.DataType) -> bool:
    """Whether an arrow type holds lists of strings."""
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and is_text(kind.value_type)


COLUMN_TYPES: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {  # what reading accepts per column
    "path": (is_text, "string"),
    "mask": (is_text, "string"),
    "class": (is_text, "string"),
    "label": (pa.types.is_integer, "integer"),
    "captions": (is_text_list, "list<string>"),
}


@dataclass(frozen=True)
class Manifest:
    """One evaluation set: records of a single kind, with class names in label order."""

    name: str
    classes: tuple[str, ...]  # class names in label order (may be empty for captioned sets)
    records: tuple[Record, ...]

    def __post_init__(self) -> None:
        types = {type(r) for r in self.records}
        unknown = sorted(t.__name__ for t in types - KINDS.keys())
        if unknown:
            raise DatasetError(f"manifest {self.name!r}: records must be one of "
                               f"{[t.__name__ for t in KINDS]}, got {unknown}")
        if len(types) > 1:
            raise DatasetError(f"manifest {self.name!r} mixes record types {sorted(t.__name__ for t in types)}; "
                               "a manifest holds one kind")
        labels = [r.label for r in self.records if isinstance(r, LABELED_TYPES)]
        bad = [k for k in labels if not 0 <= k < len(self.classes)]
        if bad:
            raise DatasetError(f"manifest {self.name!r}: labels {bad[:SHOW]} outside 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def kind(self) -> str:
        """'labeled', 'captioned' or 'masked'; an empty manifest has none."""
        if not self.records:
            raise DatasetError(f"manifest {self.name!r} is empty, so it has no record kind")
        return KINDS[type(self.records[0])]

    @property
    def paths(self) -> tuple[str, ...]:
        """Image paths, one per record."""
        return tuple(r.path for r in self.records)

    @property
    def has_labels(self) -> bool:
        """Whether every record names a class (labeled and masked images)."""
        return all(isinstance(r, LABELED_TYPES) for r in self.records)

    @property
    def labels(self) -> tuple[int, ...]:
        """Class index per record; captioned images have none."""
        if not self.has_labels:
            raise DatasetError(f"manifest {self.name!r} holds captioned images, which have no class labels")
        return tuple(r.label for r in self.records)

    def class_counts(self) -> dict[str, int]:
        """Images per class, in label order (duplicate class names are summed)."""
        counts = dict.fromkeys(self.classes, 0)
        for k in self.labels:
            counts[self.classes[k]] += 1
        return counts

    def select(self, indices: Sequence[int]) -> Manifest:
        """The records at `indices`, in that order, with the same classes."""
        return Manifest(self.name, self.classes, tuple(self.records[i] for i in indices))

    def map_paths(self, rewrite: Callable[[str], str]) -> Manifest:
        """The manifest with every file path (images and masks) rewritten."""
        return Manifest(self.name, self.classes, tuple(r.map_paths(rewrite) for r in self.records))


def build_manifest(name: str, classes: Sequence[str], items: Sequence[tuple[Path | str, int]]) -> Manifest:
    """A manifest of labelled images from (path, label) pairs."""
    return Manifest(name, tuple(classes), tuple(LabeledImage(str(p), int(k)) for p, k in items))


def write_manifest(manifest: Manifest, path: Path) -> None:
    """Parquet with the columns of the manifest's kind (SCHEMAS); classes, name and kind in the metadata."""
    meta = {CLASSES_KEY: json.dumps(list(manifest.classes)).encode(), NAME_KEY: manifest.name.encode(),
            KIND_KEY: manifest.kind.encode()}
    rows = [r.to_row(manifest.classes) for r in manifest.records]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS[manifest.kind].with_metadata(meta)), path)


def read_table_checked(path: Path) -> pa.Table:
    """The parquet table at `path`; errors name a missing or corrupt file."""
    if not path.is_file():
        raise DatasetError(f"manifest not found: {path}")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(f"cannot read manifest {path}: {err}") from err


def read_kind(meta: dict[bytes, bytes], path: Path) -> str:
    """The record kind in the metadata. A file without one is checked as labelled, so that a table
    missing columns says so first; `read_classes` then refuses it for lacking ktpipe metadata."""
    kind = meta.get(KIND_KEY, b"labeled").decode()
    if kind not in SCHEMAS:
        raise DatasetError(f"manifest {path}: unknown record kind {kind!r}; known: {list(SCHEMAS)}")
    return kind


def read_classes(meta: dict[bytes, bytes], path: Path) -> tuple[str, ...]:
    """The class list that `write_manifest` stores with the record kind in the metadata."""
    if CLASSES_KEY not in meta:
        raise DatasetError(f"manifest {path} has no class list in its metadata (write it with write_manifest)")
    if KIND_KEY not in meta:
        raise DatasetError(f"manifest {path} has no record kind in its metadata (write it with write_manifest)")
    try:
        classes = json.loads(meta[CLASSES_KEY])
    except json.JSONDecodeError as err:
        raise DatasetError(f"manifest {path}: class list in its metadata is not JSON: {err}") from err
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DatasetError(f"manifest {path}: class list in its metadata must be a JSON list of strings")
    return tuple(classes)


def is_empty(cell: object) -> bool:
    """A null cell, or a caption list that is empty or holds a null."""
    return cell is None or (isinstance(cell, list) and (not cell or None in cell))


def read_rows(table: pa.Table, kind: str, path: Path) -> list[dict]:
    """The rows of the columns of `kind`; a missing or mistyped column or an empty cell is an
    error naming the file."""
    names = SCHEMAS[kind].names
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise DatasetError(f"manifest {path} lacks column(s) {missing}; it has {table.column_names}")
    wrong = [f"{c} ({table.schema.field(c).type}, expected {COLUMN_TYPES[c][1]})"
             for c in names if not COLUMN_TYPES[c][0](table.schema.field(c).type)]
    if wrong:
        raise DatasetError(f"manifest {path}: column(s) of the wrong type: {', '.join(wrong)}")
    rows = table.select(names).to_pylist()
    empty = [i + 1 for i, row in enumerate(rows) if any(map(is_empty, row.values()))]
    if empty:
        raise DatasetError(f"manifest {path}: empty cell(s) in data row(s) {empty[:SHOW]}")
    return rows


def read_manifest(path: Path) -> Manifest:
    """A manifest written by `write_manifest`; every problem is an error that names the file."""
    path = Path(path)
    table = read_table_checked(path)
    meta = table.schema.metadata or {}
    kind = read_kind(meta, path)
    rows = read_rows(table, kind, path)
    classes = read_classes(meta, path)
    name = meta.get(NAME_KEY, path.stem.encode()).decode()
    try:
        return Manifest(name, classes, tuple(map(RECORD_TYPES[kind].from_row, rows)))
    except DatasetError as err:  # labels outside the class list
        raise DatasetError(f"manifest {path}: {err}") from err
