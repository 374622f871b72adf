"""Small capability interfaces that inversion, fine-tuning and evaluation talk to.

A backend implements the capabilities its model family has. Images enter as float pixels in
[0, 1], shape (B, 3, S, S) with S = `image_size`; each backend applies its own normalization, so
inversion can optimize raw pixels. Inversion and fine-tuning never ask which kind a model is:
they ask it for a text target and a similarity (`Invertible`), and train what `Trainable` names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Protocol, runtime_checkable

import torch
from PIL import Image

DUAL_ENCODER = "dual_encoder"  # separate image and text embeddings (CLIP, CoCa, BiomedCLIP)
CROSS_ENCODER = "cross_encoder"  # scores an image-text pair jointly (ViLT)


@runtime_checkable
class EmbedsImages(Protocol):
    """Pixels to embeddings (dual encoders)."""

    image_size: int

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, S, S) float tensor in [0, 1]."""

    def encode_images(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, S, S) pixels in [0, 1] -> (B, D) embeddings, L2-normalized unless `normalize` is False."""


@runtime_checkable
class EmbedsTexts(Protocol):
    """Texts to embeddings in the image embeddings' space (dual encoders)."""

    def encode_texts(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Texts -> (T, D) embeddings, L2-normalized unless `normalize` is False."""

    def logit_scale(self) -> torch.Tensor:
        """The temperature multiplier applied to cosine similarities (a scalar)."""


@runtime_checkable
class ScoresPairs(Protocol):
    """A match score per aligned image-text pair (every model; a cross-encoder's only view)."""

    def score_pairs(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(B, 3, S, S) pixels and B texts -> (B,) match scores."""


@runtime_checkable
class Invertible(Protocol):
    """What inversion (paper Eq. 3) optimizes pixels against."""

    image_size: int
    module: torch.nn.Module

    def text_target(self, text: str, similarity: str = "cosine") -> Any:
        """What `similarity` compares views with (a text embedding; the text itself for a cross-encoder)."""

    def similarity(self, pixels: torch.Tensor, target: Any, similarity: str = "cosine") -> torch.Tensor:
        """(N,) differentiable similarity of each image to the target (cosine or -L2; a match score)."""


@runtime_checkable
class Trainable(Protocol):
    """Which parameters fine-tuning trains, and a checkpoint its own library loads again."""

    module: torch.nn.Module  # the underlying network (for .train()/.eval()/.to())

    def tower_parameters(self, tower: str, last_blocks: int | None = None) -> Iterable[torch.nn.Parameter]:
        """Parameters of 'visual' or 'text' (or 'both'); `last_blocks` limits the visual tower
        to its last transformer blocks and head."""

    def save(self, out_dir: Path) -> None:
        """Write a checkpoint folder that the backend's own library loads again."""


@runtime_checkable
class ImageTextModel(EmbedsImages, EmbedsTexts, ScoresPairs, Invertible, Trainable, Protocol):
    """A dual encoder with every capability the classification pipeline uses (open_clip, demo)."""

    kind: str  # DUAL_ENCODER or CROSS_ENCODER, recorded in the base model's description
    can_caption: bool  # has a captioning head (CoCa)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Texts -> token ids as the backend's text tower expects."""
