"""Image I/O shared by stages: PNG grids, tensors <-> PIL, image folders."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


class DatasetError(ValueError):
    """An image folder or manifest is missing, empty, or holds unreadable images."""


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image."""
    array = (pixels.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def make_grid(pixels: torch.Tensor, columns: int | None = None, pad: int = 2) -> torch.Tensor:
    """(N, 3, H, W) -> (3, rows*(H+pad)+pad, cols*(W+pad)+pad) with white padding."""
    n, c, h, w = pixels.shape
    columns = columns or min(n, 10)
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i in range(n):
        r, k = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, top:top + h, left:left + w] = pixels[i]
    return grid


def save_grid(pixels: torch.Tensor, path: Path, columns: int | None = None, upscale: int = 4) -> None:
    """Save a PNG grid, upscaled with nearest neighbour so small renders stay visible."""
    image = to_pil(make_grid(pixels.float().cpu(), columns))
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def list_image_folder(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(path, class index) for every image in root/<class>/; errors name what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    items: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise DatasetError(f"class folder missing: {folder} (expected one folder per class under {root})")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        items.extend((p, label) for p in files)
    if not items:
        raise DatasetError(f"no images for classes {classes} under {root} (expected {root}/<class>/*.png)")
    return items


def open_image(path: Path) -> Image.Image:
    """Open an image as RGB, with an error that names a corrupt file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"cannot read image {path}: {err}") from err
