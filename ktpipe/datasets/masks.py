"""Segmentation sets: images with a binary mask of the class prompted (format 'masks').

Layout: root/images/ and root/masks/ hold files with matching stems (any suffix of
`IMAGE_SUFFIXES` on either side, e.g. images/0001.jpg with masks/0001.png). Either flat, every
image of the one class that the set's 'classes' names, or one subfolder per class in both,
images/<class>/ and masks/<class>/ (class names are the folder names, sorted; 'classes' then
keeps some of them). Every image needs a mask and every mask an image: a file without its
partner is an error naming it (a stray mask usually means a misnamed image, so it is not
skipped). Every mask is read when the set is loaded, so a mask of the wrong size or one that is
not binary fails the data stage, naming the file, instead of the evaluation.

How a mask file becomes binary (`read_mask`): it is read as grayscale (PIL mode 'L'; 16-bit and
32-bit integer masks keep their values). A lossless mask (PNG, TIFF, BMP, WebP) must be binary
already: at most two distinct pixel values, and when two, one of them 0 (0/1, 0/255, or 0 and
any label value); foreground is every nonzero pixel. A mask with more values, or with two values
none of which is 0, is an error naming the file and the values found. A JPEG mask, whose lossy
compression blurs the edges into in-between values, is foreground where its value is at least
half its maximum (an all-zero JPEG mask is empty). A mask must have its image's width and height.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ktpipe.datasets.folders import list_images, require_key
from ktpipe.datasets.records import SHOW, Manifest, MaskedImage
from ktpipe.images import IMAGE_SUFFIXES, DatasetError
from ktpipe.params import DatasetParams

IMAGES, MASKS = "images", "masks"  # the two folders under root
LOSSY_SUFFIXES = {".jpg", ".jpeg"}  # masks binarized at half their maximum instead of checked for two values
RAW_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}  # integer modes read with their own values (not clipped to 8 bit)
LISTED_VALUES = 8  # how many pixel values a non-binary mask's error lists

Size = tuple[int, int]  # (width, height), as PIL gives it


def mask_pixels(path: Path) -> np.ndarray:
    """A mask file's pixels (H, W) as integers: 'L' for colour, palette and 1-bit masks, the
    raw values for 16/32-bit integer ones; an unreadable file is an error naming it."""
    try:
        with Image.open(path) as image:
            if image.mode in RAW_MODES:
                return np.asarray(image)
            return np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"cannot read mask {path}: {err}") from err


def binarize(pixels: np.ndarray, path: Path) -> np.ndarray:
    """Foreground of a mask's pixels (H, W) by the module's rule: JPEG at half the maximum,
    anything else nonzero, provided it holds at most two values, one of them 0 when two."""
    if path.suffix.lower() in LOSSY_SUFFIXES:
        top = int(pixels.max())
        return pixels >= top / 2 if top > 0 else np.zeros(pixels.shape, dtype=bool)
    values = np.unique(pixels)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:LISTED_VALUES]) + (" ..." if len(values) > LISTED_VALUES else "")
        raise DatasetError(f"mask {path} is not binary: it holds {len(values)} pixel values ({shown}); "
                           "a mask holds 0 for background and one nonzero value for the class")
    return pixels != 0


def read_mask(path: Path | str, size: Size | None = None) -> np.ndarray:
    """The binary mask (H, W) of a mask file (module docstring: the rule); with `size`, the
    (width, height) of its image, a mask of another size is an error naming both sizes."""
    path = Path(path)
    pixels = mask_pixels(path)  # (H, W)
    if size is not None and (pixels.shape[1], pixels.shape[0]) != tuple(size):
        raise DatasetError(f"mask {path} is {pixels.shape[1]}x{pixels.shape[0]} pixels but its image is "
                           f"{size[0]}x{size[1]}; a mask must have its image's size")
    return binarize(pixels, path)


def image_size(path: Path) -> Size:
    """An image's (width, height) from its header (the pixels are not decoded)."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"cannot read image {path}: {err}") from err


def check_masked_image(image: Path, mask: Path) -> None:
    """The mask is readable, binary and of its image's size, else an error naming the file."""
    read_mask(mask, image_size(image))


def by_stem(files: Sequence[Path]) -> dict[str, Path]:
    """Files keyed by stem; two files of one stem (a.png, a.jpg) are an error naming both."""
    keyed: dict[str, Path] = {}
    for path in files:
        if path.stem in keyed:
            raise DatasetError(f"{keyed[path.stem]} and {path} share the stem {path.stem!r}; "
                               "images and masks are paired by stem, so each stem appears once per folder")
        keyed[path.stem] = path
    return keyed


def pair_files(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of one folder pair, matched by stem, in image order; an image without
    a mask, a mask without an image or a folder without images is an error naming the files."""
    images, masks = by_stem(list_images(images_dir)), by_stem(list_images(masks_dir))
    if not images:
        raise DatasetError(f"image folder {images_dir} holds no images ({sorted(IMAGE_SUFFIXES)})")
    unmasked = [str(images[s]) for s in images if s not in masks]
    if unmasked:
        raise DatasetError(f"{len(unmasked)} image(s) have no mask of the same stem in {masks_dir}, "
                           f"first: {unmasked[:SHOW]}")
    orphans = [str(masks[s]) for s in masks if s not in images]
    if orphans:
        raise DatasetError(f"{len(orphans)} mask(s) have no image of the same stem in {images_dir}, "
                           f"first: {orphans[:SHOW]}")
    return [(images[s], masks[s]) for s in images]


def subfolders(folder: Path) -> list[str]:
    """Names of the visible subfolders of `folder`, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_folders(images_dir: Path, masks_dir: Path) -> list[str]:
    """The class subfolders shared by images/ and masks/ ([] for a flat layout); a class folder
    on one side only, or images/ mixing files and class folders, is an error naming it."""
    image_classes, mask_classes = subfolders(images_dir), subfolders(masks_dir)
    lone = [str(images_dir / c) for c in image_classes if c not in mask_classes]
    lone += [str(masks_dir / c) for c in mask_classes if c not in image_classes]
    if lone:
        raise DatasetError(f"class folder(s) {lone} have no partner: each images/<class>/ needs a "
                           "masks/<class>/ and the other way round")
    if image_classes and list_images(images_dir):
        raise DatasetError(f"{images_dir} holds both images and class folders; use one layout "
                           "(flat, or one subfolder per class)")
    return image_classes


def flat_class(name: str, spec: DatasetParams, images_dir: Path) -> str:
    """The one class of a flat layout, which the set's 'classes' must name."""
    if len(spec.classes) != 1:
        raise DatasetError(f"set {name!r}: {images_dir} has no class folders, so 'classes' must name the one "
                           f"class its masks show; got {list(spec.classes)}")
    return spec.classes[0]


def load_mask_folder(name: str, spec: DatasetParams) -> Manifest:
    """Format 'masks': root/images/ and root/masks/, flat or with one subfolder per class (the
    module docstring gives the layout and the mask rule); every mask is checked here. Paths are
    root-joined, so absolute for the data stage, which makes root absolute (`resolve_spec`)."""
    root = Path(require_key(spec.root, "root", spec.format))
    images_dir, masks_dir = root / IMAGES, root / MASKS
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DatasetError(f"set {name!r}: folder not found: {folder} (format 'masks' reads "
                               f"{root}/{IMAGES}/ and {root}/{MASKS}/)")
    classes = class_folders(images_dir, masks_dir)
    if classes:
        pairs = [(image, mask, label) for label, c in enumerate(classes)
                 for image, mask in pair_files(images_dir / c, masks_dir / c)]
    else:
        classes = [flat_class(name, spec, images_dir)]
        pairs = [(image, mask, 0) for image, mask in pair_files(images_dir, masks_dir)]
    for image, mask, _ in pairs:
        check_masked_image(image, mask)
    records = tuple(MaskedImage(str(image), str(mask), label) for image, mask, label in pairs)  # under root, as given
    return Manifest(name, tuple(classes), records)
