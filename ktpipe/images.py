"""Image I/O shared by stages: PNG grids, tensors <-> PIL, inverted-image folders.

Light on purpose (torch, numpy, PIL, safetensors): the report reads inversions without
importing a model library."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file

from ktpipe.errors import InputMissingError, KtpipeError

IMAGES_FILE = "images.safetensors"  # an inversion folder: (N, 3, S, S) pixels in [0, 1]
GRID_FILE = "grid.png"  # ... a PNG grid of them
SUMMARY_FILE = "summary.json"  # ... and the final similarities with the settings used

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


INITS = ("uniform", "normal")  # how optimized (or noise) pixels start: params invert.init


def initial_pixels(n: int, size: int, generator: torch.Generator, init: str = "uniform") -> torch.Tensor:
    """(n, 3, size, size) starting pixels in [0, 1]: uniform noise, or `normal`, N(0.5, 0.5^2)
    clamped to [0, 1]. ViLT's normalization (mean and std 0.5) turns it into N(0, 1) clamped to
    [-1, 1] (std about 0.72, 32% of values at +-1), not the paper's N(0, 1) (Sec. 4.3): pixels stay
    in [0, 1], the range every inversion step clamps them to and every image has."""
    if init == "uniform":
        return torch.rand(n, 3, size, size, generator=generator)
    if init == "normal":
        return (0.5 + 0.5 * torch.randn(n, 3, size, size, generator=generator)).clamp(0.0, 1.0)
    raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")


class DatasetError(KtpipeError):
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


def open_image(path: Path) -> Image.Image:
    """Open an image as RGB, with an error that names a corrupt file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"cannot read image {path}: {err}") from err


def save_inversion(out_dir: Path, pixels: torch.Tensor, sims: torch.Tensor, meta: dict) -> None:
    """Write images (safetensors), a PNG grid and a JSON of final similarities."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"pixels": pixels.contiguous()}, str(out_dir / IMAGES_FILE))
    save_grid(pixels, out_dir / GRID_FILE)
    summary = {**meta, "similarity": [round(float(s), 5) for s in sims], "mean_similarity": float(sims.mean())}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def load_inversion(folder: Path) -> torch.Tensor:
    """Read back the (N, 3, S, S) pixels of one concept's inversion."""
    path = Path(folder) / IMAGES_FILE
    if not path.is_file():
        raise InputMissingError(f"no inverted images at {path}; run the invert stage for this concept")
    return load_file(str(path))["pixels"]
