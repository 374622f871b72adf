"""The 'masks' dataset format and masked label files on generated image/mask folders: layouts,
the binarization rule, and errors that name the offending file or key."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ktpipe.datasets import MaskedImage, load_dataset, read_manifest, write_manifest
from ktpipe.datasets.masks import load_mask_folder, read_mask
from ktpipe.images import DatasetError
from ktpipe.params import DatasetParams

SIZE = (24, 16)  # (width, height) of every generated image


def square_mask(size: tuple[int, int] = SIZE, value: int = 255) -> np.ndarray:
    """A (height, width) uint8 mask: `value` on an 8x8 block aligned with JPEG's blocks, else 0."""
    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    pixels[8:16, 8:16] = value
    return pixels


def write_image(path: Path, size: tuple[int, int] = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)
    return path


def write_mask(path: Path, pixels: np.ndarray | None = None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(square_mask() if pixels is None else pixels).save(path, **save)
    return path


def write_pairs(images: Path, masks: Path, stems: list[str], image_suffix: str = ".png",
                mask_suffix: str = ".png") -> None:
    for stem in stems:
        write_image(images / f"{stem}{image_suffix}")
        write_mask(masks / f"{stem}{mask_suffix}")


def spec(root: Path, **kw) -> DatasetParams:
    return DatasetParams(task="segmentation", format="masks", root=str(root), **kw)


def raises(match: str):
    return pytest.raises(DatasetError, match=match)


# ---------------------------------------------------------------- layouts

def test_flat_layout_with_one_class(tmp_path):
    write_pairs(tmp_path / "images", tmp_path / "masks", ["a", "b"], image_suffix=".jpg")
    manifest = load_dataset("tumors", spec(tmp_path, classes=("tumor",)), seed=0)
    assert manifest.kind == "masked" and manifest.classes == ("tumor",)
    assert manifest.records == (
        MaskedImage(str(tmp_path / "images/a.jpg"), str(tmp_path / "masks/a.png"), 0),
        MaskedImage(str(tmp_path / "images/b.jpg"), str(tmp_path / "masks/b.png"), 0))
    assert np.array_equal(read_mask(manifest.records[0].mask, SIZE), square_mask() > 0)


def test_class_subfolders_give_classes_and_filter(tmp_path):
    write_pairs(tmp_path / "images/malignant", tmp_path / "masks/malignant", ["m1", "m2"])
    write_pairs(tmp_path / "images/benign", tmp_path / "masks/benign", ["b1"], mask_suffix=".jpg")
    manifest = load_dataset("breast", spec(tmp_path), seed=0)
    assert manifest.classes == ("benign", "malignant") and manifest.labels == (0, 1, 1)
    assert manifest.records[0].mask == str(tmp_path / "masks/benign/b1.jpg")
    kept = load_dataset("breast", spec(tmp_path, classes=("malignant",)), seed=0)
    assert kept.classes == ("malignant",) and [Path(r.path).stem for r in kept.records] == ["m1", "m2"]


def test_masked_manifest_round_trips_through_parquet(tmp_path):
    write_pairs(tmp_path / "images", tmp_path / "masks", ["a"])
    manifest = load_mask_folder("one", spec(tmp_path, classes=("lesion",)))
    write_manifest(manifest, tmp_path / "one.parquet")
    assert read_manifest(tmp_path / "one.parquet") == manifest


# ---------------------------------------------------------------- the binarization rule

@pytest.mark.parametrize("value", [1, 255, 7])
def test_lossless_mask_of_zero_and_one_value(tmp_path, value):
    path = write_mask(tmp_path / "m.png", square_mask(value=value))
    assert np.array_equal(read_mask(path), square_mask() > 0)


def test_constant_masks_are_empty_or_full(tmp_path):
    empty = write_mask(tmp_path / "empty.png", np.zeros((4, 4), np.uint8))
    full = write_mask(tmp_path / "full.png", np.full((4, 4), 255, np.uint8))
    assert not read_mask(empty).any() and read_mask(full).all()


def test_jpeg_mask_is_binarized_at_half_its_maximum(tmp_path):
    rows, cols = np.mgrid[:SIZE[1], :SIZE[0]]
    disk = (rows - 8) ** 2 + (cols - 11) ** 2 <= 25  # curved edges: JPEG blurs them
    path = write_mask(tmp_path / "m.jpg", disk.astype(np.uint8) * 255, quality=60)
    raw = np.asarray(Image.open(path))
    assert len(np.unique(raw)) > 2  # lossy: in-between values
    assert np.array_equal(read_mask(path), raw >= raw.max() / 2)
    assert (read_mask(path) != disk).mean() < 0.03


def test_sixteen_bit_and_one_bit_masks(tmp_path):
    deep = tmp_path / "deep.png"
    Image.fromarray(square_mask().astype(np.uint16) * 1000).save(deep)  # values 0 and 255000 -> clipped by 'L'
    assert Image.open(deep).mode.startswith("I")
    assert np.array_equal(read_mask(deep), square_mask() > 0)
    bits = tmp_path / "bits.png"
    Image.fromarray(square_mask() > 0).save(bits)
    assert np.array_equal(read_mask(bits), square_mask() > 0)


def test_three_values_is_not_binary(tmp_path):
    pixels = square_mask()
    pixels[0, 0] = 128
    path = write_mask(tmp_path / "grey.png", pixels)
    with raises(r"mask .*grey\.png is not binary: it holds 3 pixel values \(0, 128, 255\)"):
        read_mask(path)


def test_two_values_without_zero_is_not_binary(tmp_path):
    path = write_mask(tmp_path / "shifted.png", square_mask() // 2 + 1)  # values 1 and 128
    with raises(r"shifted\.png is not binary.*\(1, 128\)"):
        read_mask(path)


def test_mask_of_another_size_names_both_sizes(tmp_path):
    path = write_mask(tmp_path / "m.png")
    with raises(r"mask .*m\.png is 24x16 pixels but its image is 32x16"):
        read_mask(path, (32, 16))


def test_unreadable_mask_names_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with raises(r"cannot read mask .*broken\.png"):
        read_mask(path)


# ---------------------------------------------------------------- folder errors

def test_image_without_mask_names_the_image(tmp_path):
    write_pairs(tmp_path / "images", tmp_path / "masks", ["a"])
    write_image(tmp_path / "images/lonely.png")
    with raises(r"1 image\(s\) have no mask .*lonely\.png"):
        load_mask_folder("s", spec(tmp_path, classes=("x",)))


def test_mask_without_image_names_the_mask(tmp_path):
    write_pairs(tmp_path / "images", tmp_path / "masks", ["a"])
    write_mask(tmp_path / "masks/stray.png")
    with raises(r"1 mask\(s\) have no image .*stray\.png"):
        load_mask_folder("s", spec(tmp_path, classes=("x",)))


def test_loader_checks_mask_size_against_image(tmp_path):
    write_image(tmp_path / "images/a.png", (32, 16))
    write_mask(tmp_path / "masks/a.png")
    with raises(r"mask .*masks/a\.png is 24x16 pixels but its image is 32x16"):
        load_mask_folder("s", spec(tmp_path, classes=("x",)))


def test_loader_checks_binariness(tmp_path):
    write_image(tmp_path / "images/cls/a.png")
    pixels = square_mask()
    pixels[0, :3] = (1, 2, 3)
    write_mask(tmp_path / "masks/cls/a.png", pixels)
    with raises(r"masks/cls/a\.png is not binary: it holds 5 pixel values"):
        load_mask_folder("s", spec(tmp_path))


@pytest.mark.parametrize("classes", [(), ("a", "b")])
def test_flat_layout_needs_exactly_one_class(tmp_path, classes):
    write_pairs(tmp_path / "images", tmp_path / "masks", ["a"])
    with raises(r"set 's': .*images has no class folders, so 'classes' must name the one class"):
        load_mask_folder("s", spec(tmp_path, classes=classes))


def test_class_folder_without_partner(tmp_path):
    write_pairs(tmp_path / "images/cat", tmp_path / "masks/cat", ["a"])
    (tmp_path / "masks/dog").mkdir()
    with raises(r"masks/dog'\] have no partner"):
        load_mask_folder("s", spec(tmp_path))


def test_missing_folders_and_duplicate_stems(tmp_path):
    with raises(r"folder not found: .*images"):
        load_mask_folder("s", spec(tmp_path, classes=("x",)))
    write_pairs(tmp_path / "images", tmp_path / "masks", ["a"])
    write_image(tmp_path / "images/a.jpg")
    with raises(r"share the stem 'a'"):
        load_mask_folder("s", spec(tmp_path, classes=("x",)))


# ---------------------------------------------------------------- label files with a mask column

def manifest_spec(root: Path, labels: str) -> DatasetParams:
    return DatasetParams(task="segmentation", format="manifest", root=str(root), labels=labels)


def test_label_file_with_mask_column_gives_masked_records(tmp_path):
    write_pairs(tmp_path / "img", tmp_path / "seg", ["a", "b"])
    pd.DataFrame({"path": ["img/a.png", "img/b.png"], "label": ["lung", "heart"],
                  "mask": ["seg/a.png", str(tmp_path / "seg/b.png")]}).to_csv(tmp_path / "list.csv", index=False)
    manifest = load_dataset("organs", manifest_spec(tmp_path, "list.csv"), seed=0)
    assert manifest.kind == "masked" and manifest.classes == ("heart", "lung")
    assert manifest.records == (MaskedImage(str(tmp_path / "img/a.png"), str(tmp_path / "seg/a.png"), 1),
                                MaskedImage(str(tmp_path / "img/b.png"), str(tmp_path / "seg/b.png"), 0))


def test_label_file_without_mask_column_stays_labeled(tmp_path):
    write_pairs(tmp_path / "img", tmp_path / "seg", ["a"])
    pd.DataFrame({"path": ["img/a.png"], "label": ["lung"]}).to_csv(tmp_path / "list.csv", index=False)
    assert load_dataset("organs", manifest_spec(tmp_path, "list.csv"), seed=0).kind == "labeled"


def test_label_file_missing_mask_file_names_it(tmp_path):
    write_pairs(tmp_path / "img", tmp_path / "seg", ["a"])
    pd.DataFrame({"path": ["img/a.png"], "label": ["lung"], "mask": ["seg/gone.png"]}).to_csv(
        tmp_path / "list.csv", index=False)
    with raises(r"1 mask file\(s\) listed in .*list\.csv not found, first: \[.*seg/gone\.png"):
        load_dataset("organs", manifest_spec(tmp_path, "list.csv"), seed=0)


def test_label_file_empty_mask_cell_and_bad_mask(tmp_path):
    write_pairs(tmp_path / "img", tmp_path / "seg", ["a", "b"])
    pd.DataFrame({"path": ["img/a.png", "img/b.png"], "label": ["lung", "lung"], "mask": ["seg/a.png", None]}).to_csv(
        tmp_path / "list.csv", index=False)
    with raises(r"empty mask in data row\(s\) \[2\]"):
        load_dataset("organs", manifest_spec(tmp_path, "list.csv"), seed=0)
    write_mask(tmp_path / "seg/small.png", np.zeros((4, 4), np.uint8))
    pd.DataFrame({"path": ["img/a.png"], "label": ["lung"], "mask": ["seg/small.png"]}).to_csv(
        tmp_path / "list.csv", index=False)
    with raises(r"small\.png is 4x4 pixels but its image is 24x16"):
        load_dataset("organs", manifest_spec(tmp_path, "list.csv"), seed=0)
