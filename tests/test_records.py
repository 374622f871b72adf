"""Typed records and their manifests: one kind per manifest, parquet round trips, errors naming the file."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ktpipe.datasets import (
    CaptionedImage,
    LabeledImage,
    Manifest,
    MaskedImage,
    build_manifest,
    load_eval_set,
    read_manifest,
    write_manifest,
)
from ktpipe.datasets.records import CLASSES_KEY, KIND_KEY
from ktpipe.datasets.sets import summarize_set
from ktpipe.images import DatasetError
from ktpipe.params import DatasetParams

LABELED = build_manifest("pets", ("dog", "cat"), [("val/dog/a.png", 0), ("/abs/b.png", 1)])
CAPTIONED = Manifest("coco", (), (CaptionedImage("val/1.jpg", ("a dog on a couch", "a sleeping dog")),
                                  CaptionedImage("/abs/2.jpg", ("two cats",))))
MASKED = Manifest("seg", ("lung", "heart"), (MaskedImage("img/1.png", "masks/1_lung.png", 0),
                                             MaskedImage("/abs/2.png", "/abs/2_heart.png", 1)))
COLUMNS = {"labeled": ["path", "label", "class"], "captioned": ["path", "captions"],
           "masked": ["path", "mask", "label", "class"]}


def raises(match: str):
    return pytest.raises(DatasetError, match=match)


def resolved(eval_dir: Path, path: str) -> str:
    """What `load_eval_set` should make of a stored path: relative ones joined to the set folder."""
    return path if Path(path).is_absolute() else str(eval_dir / path)


@pytest.mark.parametrize("manifest", [LABELED, CAPTIONED, MASKED], ids=lambda m: m.name)
def test_round_trip_each_kind(tmp_path, manifest):
    path = tmp_path / f"{manifest.name}.parquet"
    write_manifest(manifest, path)
    assert read_manifest(path) == manifest
    table = pq.read_table(path)
    assert table.column_names == COLUMNS[manifest.kind]
    assert table.schema.metadata[KIND_KEY].decode() == manifest.kind
    loaded = load_eval_set(tmp_path, manifest.name)
    assert loaded.kind == manifest.kind and loaded.classes == manifest.classes
    assert loaded.paths == tuple(resolved(tmp_path, p) for p in manifest.paths)


def test_round_trip_resolves_masks_and_keeps_captions(tmp_path):
    write_manifest(MASKED, tmp_path / "seg.parquet")
    masks = [r.mask for r in load_eval_set(tmp_path, "seg").records]
    assert masks == [str(tmp_path / "masks/1_lung.png"), "/abs/2_heart.png"]
    assert load_eval_set(tmp_path, "seg").labels == (0, 1)
    write_manifest(CAPTIONED, tmp_path / "coco.parquet")
    assert pq.read_table(tmp_path / "coco.parquet").schema.field("captions").type == pa.list_(pa.string())
    records = load_eval_set(tmp_path, "coco").records
    assert [r.captions for r in records] == [("a dog on a couch", "a sleeping dog"), ("two cats",)]


def test_kind_paths_and_labels():
    assert (LABELED.kind, CAPTIONED.kind, MASKED.kind) == ("labeled", "captioned", "masked")
    assert LABELED.paths == ("val/dog/a.png", "/abs/b.png") and LABELED.labels == (0, 1) and len(LABELED) == 2
    assert MASKED.labels == (0, 1) and MASKED.class_counts() == {"lung": 1, "heart": 1}
    assert CAPTIONED.paths == ("val/1.jpg", "/abs/2.jpg") and len(CAPTIONED) == 2
    with raises("manifest 'coco' holds captioned images, which have no class labels"):
        CAPTIONED.labels
    with raises("empty, so it has no record kind"):
        Manifest("none", ("a",), ()).kind


def test_mixed_record_types_rejected():
    with raises(r"manifest 'mix' mixes record types \['CaptionedImage', 'LabeledImage'\]; a manifest holds one kind"):
        Manifest("mix", ("a",), (LabeledImage("x.png", 0), CaptionedImage("y.png", ("a y",))))
    with raises(r"labels \[2\] outside 0..1"):
        Manifest("seg", ("a", "b"), (MaskedImage("x.png", "x_mask.png", 2),))


def test_map_paths_rewrites_images_and_masks():
    moved = MASKED.map_paths(lambda p: p.upper())
    assert moved.records[0] == MaskedImage("IMG/1.PNG", "MASKS/1_LUNG.PNG", 0)
    upper = build_manifest("pets", ("dog", "cat"), [("VAL/DOG/A.PNG", 0), ("/ABS/B.PNG", 1)])
    assert LABELED.map_paths(str.upper) == upper


def test_summary_per_kind():
    folder = DatasetParams(format="folder")
    assert summarize_set(MASKED, folder) == {"format": "folder", "kind": "masked", "n_images": 2,
                                             "classes": ["lung", "heart"], "per_class": {"lung": 1, "heart": 1}}
    assert summarize_set(CAPTIONED, folder) == {"format": "folder", "kind": "captioned", "n_images": 2,
                                                "classes": []}


def write_table(path: Path, columns: dict, kind: str | None = "labeled", classes: str = '["a", "b"]') -> Path:
    """A parquet file with ktpipe metadata written by hand, to break one thing at a time."""
    meta = {CLASSES_KEY: classes.encode()} | ({KIND_KEY: kind.encode()} if kind else {})
    pq.write_table(pa.table(columns).replace_schema_metadata(meta), path)
    return path


def test_malformed_parquet_named_in_error(tmp_path):
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 but not really")
    with raises(r"cannot read manifest .*corrupt.parquet"):
        read_manifest(tmp_path / "corrupt.parquet")
    good = {"path": ["a.png"], "label": [0], "class": ["a"]}
    cases = {
        "kind.parquet": (good, "boxes", '["a"]', r"kind.parquet: unknown record kind 'boxes'"),
        "nokind.parquet": (good, None, '["a"]', r"nokind.parquet has no record kind in its metadata"),
        "json.parquet": (good, "labeled", "[a", r"json.parquet: class list in its metadata is not JSON"),
        "range.parquet": (good, "labeled", "[]", r"range.parquet: manifest 'range': labels \[0\] outside"),
        "cols.parquet": (good, "masked", '["a"]', r"cols.parquet lacks column\(s\) \['mask'\]"),
        "type.parquet": ({"path": ["a.png"], "captions": ["one string"]}, "captioned", "[]",
                         r"type.parquet: column\(s\) of the wrong type: captions \(string, expected list<string>\)"),
        "label.parquet": ({"path": ["a.png"], "label": ["0"], "class": ["a"]}, "labeled", '["a"]',
                          r"label.parquet: column\(s\) of the wrong type: label \(string, expected integer\)"),
        "null.parquet": ({"path": ["a.png", None], "label": [0, 0], "class": ["a", "a"]}, "labeled", '["a"]',
                         r"null.parquet: empty cell\(s\) in data row\(s\) \[2\]"),
        "nocaps.parquet": ({"path": ["a.png", "b.png"], "captions": [["x"], []]}, "captioned", "[]",
                           r"nocaps.parquet: empty cell\(s\) in data row\(s\) \[2\]"),
    }
    for name, (columns, kind, classes, match) in cases.items():
        with raises(match):
            read_manifest(write_table(tmp_path / name, columns, kind, classes))
