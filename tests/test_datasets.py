"""Dataset loaders on generated fixtures: layouts, errors, class filter, subsets, manifest files."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from ktpipe.datasets import (
    LabeledImage,
    Manifest,
    build_manifest,
    load_dataset,
    load_eval_set,
    read_manifest,
    run_data,
    write_manifest,
)
from ktpipe.datasets.imagenet import imagenet100_wnids, imagenet_classnames, imagenet_wnids, read_data_lines
from ktpipe.datasets.medical import CHEXPERT_CLASSES
from ktpipe.datasets.selection import take_subset
from ktpipe.datasets.sets import FORMATS
from ktpipe.images import DatasetError, open_image
from ktpipe.params import DATASET_FORMATS, DatasetParams, EvaluateParams, Params
from ktpipe.templates import load_templates


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


def write_images(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / n for n in names]
    for p in paths:
        p.write_bytes(PNG)
    return paths


def spec(fmt: str, root: Path | None = None, labels: str | Path | None = None, **kw) -> DatasetParams:
    return DatasetParams(format=fmt, root=str(root) if root else None, labels=str(labels) if labels else None, **kw)


def raises(match: str):
    return pytest.raises(DatasetError, match=match)


# ---------------------------------------------------------------- shipped data files

def test_shipped_class_lists():
    wnids, names, sub = imagenet_wnids(), imagenet_classnames(), imagenet100_wnids()
    assert len(wnids) == 1000 and len(names) == 1000 and len(sub) == 100
    assert list(wnids) == sorted(set(wnids))
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    assert names[0] == "tench" and names[-1] == "toilet paper"
    assert len(set(sub)) == 100 and set(sub) <= set(wnids)
    assert all(re.fullmatch(r"n\d{8}", w) for w in (*wnids, *sub))


def test_shipped_files_start_with_a_source_comment():
    for parts in [("imagenet", "wnids.txt"), ("imagenet", "classnames.txt"), ("imagenet", "imagenet100.txt"),
                  ("templates", "openai_imagenet.txt"), ("templates", "chest_xray.txt")]:
        first = (Path(__file__).parents[1] / "ktpipe" / "data" / Path(*parts)).read_text().splitlines()[0]
        assert first.startswith("# "), parts
    assert not any(line.startswith("#") for line in read_data_lines("imagenet", "wnids.txt"))


def test_shipped_templates():
    openai = load_templates("openai_imagenet")
    assert len(openai) == 80 and len(set(openai)) == 80
    assert openai[0] == "a bad photo of a {}." and all(t.format("x").count("x") >= 1 for t in openai)
    assert all("{}" in t for t in load_templates("chest_xray"))


def test_formats_cover_params():
    assert set(FORMATS) == set(DATASET_FORMATS)


# ---------------------------------------------------------------- folder

def test_folder_loads_classes_labels_paths(tmp_path):
    write_images(tmp_path / "b_class", ["2.png", "1.jpg"])
    write_images(tmp_path / "A class", ["x.png"])
    (tmp_path / "b_class" / "notes.txt").write_text("not an image")
    m = load_dataset("toy", spec("folder", tmp_path), seed=0)
    assert m.name == "toy" and m.classes == ("A class", "b_class")
    assert m.labels == (0, 1, 1) and len(m) == 3
    assert [Path(p).name for p in m.paths] == ["x.png", "1.jpg", "2.png"]
    assert open_image(Path(m.paths[0])).size == (4, 4)


def test_folder_errors(tmp_path):
    with raises("image folder not found.*nowhere"):
        load_dataset("toy", spec("folder", tmp_path / "nowhere"), 0)
    with raises("no class folders"):
        load_dataset("toy", spec("folder", tmp_path), 0)
    (tmp_path / "empty_class").mkdir()
    with raises("empty_class holds no images"):
        load_dataset("toy", spec("folder", tmp_path), 0)
    with raises("needs 'root'"):
        load_dataset("toy", spec("folder"), 0)


def test_demo_and_unknown_formats_are_refused(tmp_path):
    with raises("demo format is rendered by the data stage"):
        load_dataset("toy", spec("demo"), 0)
    with raises("unknown dataset format 'coco'"):
        load_dataset("toy", spec("coco", tmp_path), 0)


# ---------------------------------------------------------------- manifest

@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_file_loads_csv_and_parquet(tmp_path, suffix):
    write_images(tmp_path / "img", ["a.png", "b.png", "c.png"])
    frame = pd.DataFrame({"path": ["img/a.png", "img/b.png", "img/c.png"], "label": ["dog", "cat", "dog"]})
    table = tmp_path / f"labels{suffix}"
    frame.to_csv(table, index=False) if suffix == ".csv" else frame.to_parquet(table)
    m = load_dataset("pets", spec("manifest", tmp_path, table.name), 0)
    assert m.classes == ("cat", "dog") and m.labels == (1, 0, 1)
    assert m.paths == tuple(str(tmp_path / p) for p in frame["path"])


def test_manifest_file_errors(tmp_path):
    write_images(tmp_path, ["a.png"])
    with raises("label file not found"):
        load_dataset("x", spec("manifest", tmp_path, "nope.csv"), 0)
    (tmp_path / "empty.csv").write_text("")
    with raises("cannot read label file .*empty.csv"):
        load_dataset("x", spec("manifest", tmp_path, "empty.csv"), 0)
    (tmp_path / "header.csv").write_text("path,label\n")
    with raises("header.csv has no rows"):
        load_dataset("x", spec("manifest", tmp_path, "header.csv"), 0)
    (tmp_path / "cols.csv").write_text("file,label\na.png,dog\n")
    with raises(r"lacks column\(s\) \['path'\]; it has \['file', 'label'\]"):
        load_dataset("x", spec("manifest", tmp_path, "cols.csv"), 0)
    (tmp_path / "gone.csv").write_text("path,label\na.png,dog\nb.png,cat\nc.png,cat\n")
    with raises(r"2 image\(s\) listed in .*gone.csv not found, first: \[.*b.png.*c.png"):
        load_dataset("x", spec("manifest", tmp_path, "gone.csv"), 0)
    (tmp_path / "blank.csv").write_text("path,label\na.png,dog\na.png,\n")
    with raises(r"empty path or label in data row\(s\) \[2\]"):
        load_dataset("x", spec("manifest", tmp_path, "blank.csv"), 0)


# ---------------------------------------------------------------- imagenet / imagenet100

@pytest.fixture(scope="module")
def imagenet_val(tmp_path_factory) -> Path:
    """root/val/<wnid>/ILSVRC2012_val_*.JPEG (PNG bytes) for all 1000 wnids, one image each."""
    root = tmp_path_factory.mktemp("imagenet")
    for k, wnid in enumerate(imagenet_wnids()):
        write_images(root / "val" / wnid, [f"ILSVRC2012_val_{k:08d}.JPEG"])
    return root


def test_imagenet_full_fixture(imagenet_val):
    for root in (imagenet_val, imagenet_val / "val"):
        m = load_dataset("in1k", spec("imagenet", root), 0)
        assert len(m) == 1000 and m.classes == imagenet_classnames()
        assert m.labels == tuple(range(1000))
        assert Path(m.paths[0]).parent.name == "n01440764" and Path(m.paths[-1]).parent.name == "n15075141"


def test_imagenet_missing_wnid_folders(tmp_path):
    write_images(tmp_path / "n01440764", ["a.JPEG"])
    write_images(tmp_path / "n01443537", ["b.JPEG"])
    with raises(r"998 of 1000 wnid folders missing under .*first: \['n01484850'"):
        load_dataset("in1k", spec("imagenet", tmp_path), 0)
    flat = tmp_path / "flat"
    write_images(flat, ["ILSVRC2012_val_00000001.JPEG"])
    with raises("images are flat: sort them into wnid folders"):
        load_dataset("in1k", spec("imagenet", flat), 0)


def test_imagenet_classes_filter_and_subset(imagenet_val):
    m = load_dataset("in1k", spec("imagenet", imagenet_val, classes=("goldfish", "Tench", "missile")), 0)
    assert m.classes == ("tench", "goldfish", "missile", "missile")  # both OpenAI 'missile' classes
    assert m.labels == (0, 1, 2, 3)
    m = load_dataset("in1k", spec("imagenet", imagenet_val, subset=10), 0)
    assert len(m) == 10 and len(set(m.labels)) == 10


def test_imagenet100_from_imagenet1k_layout(imagenet_val):
    m = load_dataset("in100", spec("imagenet100", imagenet_val), 0)
    wnids = sorted(imagenet100_wnids())
    names = dict(zip(imagenet_wnids(), imagenet_classnames()))
    assert len(m) == 100 and m.classes == tuple(names[w] for w in wnids)
    assert [Path(p).parent.name for p in m.paths] == wnids


def test_imagenet100_kaggle_layout(tmp_path):
    for wnid in imagenet100_wnids():
        write_images(tmp_path / "val.X" / wnid, ["a.JPEG", "b.JPEG"])
    m = load_dataset("in100", spec("imagenet100", tmp_path), 0)
    assert len(m) == 200 and len(m.classes) == 100
    chosen = sorted(imagenet100_wnids())[:3]
    (tmp_path / "Labels.json").write_text(json.dumps({w: "some, names" for w in chosen}))
    m = load_dataset("in100", spec("imagenet100", tmp_path), 0)
    names = dict(zip(imagenet_wnids(), imagenet_classnames()))
    assert m.classes == tuple(names[w] for w in chosen) and m.labels == (0, 0, 1, 1, 2, 2)
    (tmp_path / "Labels.json").write_text(json.dumps({"n99999999": "made up"}))
    with raises(r"Labels.json: keys must be ImageNet-1k wnids; unknown: \['n99999999'\]"):
        load_dataset("in100", spec("imagenet100", tmp_path), 0)


def test_imagenet100_missing_folders(tmp_path):
    write_images(tmp_path / "val.X" / imagenet100_wnids()[0], ["a.JPEG"])
    with raises("99 of 100 wnid folders missing"):
        load_dataset("in100", spec("imagenet100", tmp_path), 0)


# ---------------------------------------------------------------- CheXpert-5x200

def chexpert_csv(path: Path, rows: list[tuple[str, list[float]]], path_column: str = "Path") -> Path:
    frame = pd.DataFrame([{path_column: p, "Sex": "F", **dict(zip(CHEXPERT_CLASSES, v))} for p, v in rows])
    frame.to_csv(path, index=False)
    return path


def test_chexpert_loads_one_hot_rows(tmp_path):
    write_images(tmp_path / "CheXpert-v1.0" / "valid", [f"{k}.jpg" for k in range(5)])
    rows = [(f"CheXpert-v1.0/valid/{k}.jpg", [1.0 if j == k else (-1.0 if j == 0 else 0.0) for j in range(5)])
            for k in (4, 0, 2, 1, 3)]
    for column in ("Path", "imgpath"):
        csv = chexpert_csv(tmp_path / f"5x200_{column}.csv", rows, column)
        m = load_dataset("chexpert", spec("chexpert5x200", tmp_path, csv.name), 0)
        assert m.classes == ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion")
        assert m.labels == (4, 0, 2, 1, 3)
        assert m.paths[0] == str(tmp_path / "CheXpert-v1.0/valid/4.jpg")


def test_chexpert_errors(tmp_path):
    write_images(tmp_path, ["a.jpg", "b.jpg"])
    csv = chexpert_csv(tmp_path / "two.csv", [("a.jpg", [1, 0, 0, 0, 0]), ("b.jpg", [1, 1, 0, 0, 0])])
    with raises(r"two.csv line 3 \(data row 2\): expected exactly one positive.*\['Atelectasis', 'Cardiomegaly'\]"):
        load_dataset("c", spec("chexpert5x200", tmp_path, csv.name), 0)
    csv = chexpert_csv(tmp_path / "none.csv", [("a.jpg", [0, 0, -1, 0, 0])])
    with raises("line 2 .* found none"):
        load_dataset("c", spec("chexpert5x200", tmp_path, csv.name), 0)
    pd.DataFrame({"Path": ["a.jpg"], "Edema": [1]}).to_csv(tmp_path / "cols.csv", index=False)
    with raises(r"lacks column\(s\) \['Atelectasis', 'Cardiomegaly', 'Consolidation', 'Pleural Effusion'\]"):
        load_dataset("c", spec("chexpert5x200", tmp_path, "cols.csv"), 0)
    pd.DataFrame({"file": ["a.jpg"], "Edema": [1]}).to_csv(tmp_path / "nopath.csv", index=False)
    with raises(r"lacks an image path column \['Path', 'imgpath'\]"):
        load_dataset("c", spec("chexpert5x200", tmp_path, "nopath.csv"), 0)
    csv = chexpert_csv(tmp_path / "gone.csv", [("a.jpg", [1, 0, 0, 0, 0]), ("zz.jpg", [0, 1, 0, 0, 0])])
    with raises(r"1 image\(s\) listed in .*gone.csv not found.*zz.jpg"):
        load_dataset("c", spec("chexpert5x200", tmp_path, csv.name), 0)
    with raises("needs 'labels'"):
        load_dataset("c", spec("chexpert5x200", tmp_path), 0)


# ---------------------------------------------------------------- JSRT

CLNDAT = (
    "JPCLN001.IMG\t3\t15\t53\tmale\t1634\t692\tmalignant\tl.upper lobe\tlung cancer\n"
    "JPCLN002.IMG\t5\t30\t72\tfemale\t1302\t1009\tbenign\tr.lower lobe\tgranuloma\n"
    "\n"
    "JPCLN003.IMG\t2\t10\t?\tmale\t526\t1076\tmalignant\tr.middle lobe\tadenocarcinoma\n"
)


def test_jsrt_loads_clinical_file(tmp_path):
    write_images(tmp_path / "png", ["JPCLN001.png", "JPCLN002.PNG", "JPCLN003.jpg"])
    (tmp_path / "CLNDAT_EN.txt").write_text(CLNDAT)
    m = load_dataset("jsrt", spec("jsrt", tmp_path / "png", tmp_path / "CLNDAT_EN.txt"), 0)
    assert m.classes == ("benign nodule", "lung cancer") and m.labels == (1, 0, 1)
    assert [Path(p).name for p in m.paths] == ["JPCLN001.png", "JPCLN002.PNG", "JPCLN003.jpg"]


def test_jsrt_errors(tmp_path):
    (tmp_path / "CLNDAT_EN.txt").write_text(CLNDAT + "JPCLN004.IMG\t3\t12\t60\tmale\t1\t2\t?\tunknown\n")
    with raises(r"CLNDAT_EN.txt line 5: expected the word 'benign' or 'malignant', got 'JPCLN004"):
        load_dataset("jsrt", spec("jsrt", tmp_path, "CLNDAT_EN.txt"), 0)
    (tmp_path / "CLNDAT_EN.txt").write_text(CLNDAT)
    write_images(tmp_path, ["JPCLN001.png"])
    (tmp_path / "JPCLN002.IMG").write_bytes(b"\0" * 16)
    with raises(r"2 JSRT image\(s\) not found.*\['JPCLN002', 'JPCLN003'\].*convert them to PNG first"):
        load_dataset("jsrt", spec("jsrt", tmp_path, "CLNDAT_EN.txt"), 0)
    (tmp_path / "empty.txt").write_text("\n\n")
    with raises("no cases in JSRT clinical file"):
        load_dataset("jsrt", spec("jsrt", tmp_path, "empty.txt"), 0)


# ---------------------------------------------------------------- class filter and subsets

@pytest.fixture
def unbalanced(tmp_path) -> Path:
    """Three classes with 12, 5 and 2 images."""
    for name, n in [("Snow_Leopard", 12), ("b", 5), ("c", 2)]:
        write_images(tmp_path / name, [f"{k:02d}.png" for k in range(n)])
    return tmp_path


def test_classes_filter(unbalanced):
    m = load_dataset("s", spec("folder", unbalanced, classes=("c", "snow leopard")), 0)
    assert m.classes == ("Snow_Leopard", "c") and m.class_counts() == {"Snow_Leopard": 12, "c": 2}
    assert set(m.labels) == {0, 1}
    with raises(r"no class\(es\) \['zebra'\]; its 3 classes: Snow_Leopard, b, c"):
        load_dataset("s", spec("folder", unbalanced, classes=("zebra", "b")), 0)


def test_subset_is_deterministic_balanced_and_nested(unbalanced):
    full = load_dataset("s", spec("folder", unbalanced), 0)
    small = load_dataset("s", spec("folder", unbalanced, subset=6), seed=3)
    assert small == load_dataset("s", spec("folder", unbalanced, subset=6), seed=3)
    assert small.class_counts() == {"Snow_Leopard": 2, "b": 2, "c": 2}
    big = load_dataset("s", spec("folder", unbalanced, subset=11), seed=3)
    assert big.class_counts() == {"Snow_Leopard": 5, "b": 4, "c": 2}  # c runs out, the others share its place
    assert set(small.paths) <= set(big.paths)
    assert list(big.paths) == sorted(big.paths, key=full.paths.index)  # original order kept
    other = load_dataset("s", spec("folder", unbalanced, subset=6), seed=4)
    assert other.class_counts() == small.class_counts() and other.paths != small.paths
    assert load_dataset("s", spec("folder", unbalanced, subset=100), 0) == full
    with raises("subset must be a positive number"):
        load_dataset("s", spec("folder", unbalanced, subset=0), 0)


def test_subset_of_a_class_does_not_depend_on_the_filter(unbalanced):
    alone = load_dataset("s", spec("folder", unbalanced, classes=("b",), subset=3), 1)
    both = load_dataset("s", spec("folder", unbalanced, classes=("b", "c"), subset=5), 1)
    assert set(alone.paths) <= set(both.paths)


def test_take_subset_on_empty_classes():
    m = build_manifest("m", ("a", "b"), [("x", 0), ("y", 0), ("z", 0)])
    assert take_subset(m, 2, 0).labels == (0, 0)


# ---------------------------------------------------------------- manifest files

def test_manifest_round_trip(tmp_path):
    m = build_manifest("mixed", ("dog", "cat", "unseen"), [("img/a.png", 1), ("/abs/b.png", 0)])
    path = tmp_path / "out" / "mixed.parquet"
    write_manifest(m, path)
    assert read_manifest(path) == m
    table = pd.read_parquet(path)
    assert list(table.columns) == ["path", "label", "class"] and list(table["class"]) == ["cat", "dog"]


def test_read_manifest_without_metadata_and_errors(tmp_path):
    pd.DataFrame({"path": ["a", "b"], "label": [1, 0], "class": ["y", "x"]}).to_parquet(tmp_path / "plain.parquet")
    with raises("plain.parquet has no class list in its metadata"):
        read_manifest(tmp_path / "plain.parquet")
    with raises("manifest not found"):
        read_manifest(tmp_path / "missing.parquet")
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet at all")
    with raises("cannot read manifest .*corrupt.parquet"):
        read_manifest(tmp_path / "corrupt.parquet")
    pd.DataFrame({"path": ["a"]}).to_parquet(tmp_path / "cols.parquet")
    with raises(r"lacks column\(s\) \['label', 'class'\]"):
        read_manifest(tmp_path / "cols.parquet")


def test_manifest_validates_records_and_labels():
    with raises(r"records must be one of \['LabeledImage', 'CaptionedImage', 'MaskedImage'\], got \['str'\]"):
        Manifest("m", ("a",), ("x", "y"))  # paths where records belong: the old (paths, labels) fields
    with raises(r"labels \[3\] outside 0..1"):
        Manifest("m", ("a", "b"), (LabeledImage("x", 3),))


# ---------------------------------------------------------------- evaluation sets (data stage)

def test_run_data_writes_manifests_and_summary(unbalanced, tmp_path_factory):
    sets = {"toy": spec("folder", unbalanced, subset=6), "few": spec("folder", unbalanced, classes=("c",))}
    params = Params(evaluate=EvaluateParams(sets=sets))
    out = tmp_path_factory.mktemp("data") / "eval"  # outside the dataset folder
    summary = run_data(params, out)
    assert summary["toy"] == {"format": "folder", "kind": "labeled", "n_images": 6,
                              "classes": ["Snow_Leopard", "b", "c"],
                              "per_class": {"Snow_Leopard": 2, "b": 2, "c": 2}}
    assert json.loads((out / "sets.json").read_text()) == summary
    assert load_eval_set(out, "few") == load_dataset("few", sets["few"], 0)
    with raises(r"evaluation set 'gone' not found at .*gone.parquet; run the data stage"):
        load_eval_set(out, "gone")
    with raises("'evaluate.sets' is empty"):
        run_data(Params(), out.parent / "none")
