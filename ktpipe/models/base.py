"""The one interface that inversion, fine-tuning and evaluation talk to."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

import torch
from PIL import Image

DUAL_ENCODER = "dual_encoder"  # separate image and text embeddings (CLIP, CoCa, BiomedCLIP)
CROSS_ENCODER = "cross_encoder"  # scores an image-text pair jointly (ViLT)


@runtime_checkable
class ImageTextModel(Protocol):
    """What ktpipe needs from an image-text model.

    Images enter as float pixels in [0, 1], shape (B, 3, S, S) with S = `image_size`;
    each backend applies its own normalization so inversion can optimize raw pixels.
    """

    kind: str  # DUAL_ENCODER or CROSS_ENCODER
    image_size: int
    can_caption: bool  # has a captioning head (CoCa)
    module: torch.nn.Module  # the underlying network (for .train()/.eval()/.to())

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, S, S) float tensor in [0, 1]."""

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Texts -> token ids as the backend's text tower expects."""

    def encode_images(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, S, S) pixels in [0, 1] -> (B, D) embeddings, L2-normalized unless `normalize` is False."""

    def encode_texts(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Texts -> (T, D) embeddings, L2-normalized unless `normalize` is False."""

    def score_pairs(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(B, 3, S, S) pixels and B texts -> (B,) match scores, one per aligned pair."""

    def logit_scale(self) -> torch.Tensor:
        """The temperature multiplier applied to cosine similarities (a scalar)."""

    def tower_parameters(self, tower: str, last_blocks: int | None = None) -> Iterable[torch.nn.Parameter]:
        """Parameters of 'visual' or 'text' (or 'both'); `last_blocks` limits the visual tower
        to its last transformer blocks and head."""

    def save(self, out_dir: Path) -> None:
        """Write a checkpoint folder that the backend's own library loads again."""
