"""Fake model kinds that prove the capability interfaces take new families without a branch:
a cross-encoder that only scores image-text pairs (no embeddings), as ViLT does. Not a test module."""
from __future__ import annotations

import torch

from ktpipe.models import CROSS_ENCODER


class FakeCrossEncoder:
    """Scores a pair from a tiny conv net on the pixels and a character-embedding bag of the text."""

    kind = CROSS_ENCODER
    image_size = 16

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.module = torch.nn.ModuleDict({
            "vision": torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                          torch.nn.Flatten(), torch.nn.Linear(8, 8)),
            "chars": torch.nn.Embedding(256, 8),
        })

    def _text(self, texts: list[str]) -> torch.Tensor:
        ids = [torch.tensor([min(ord(c), 255) for c in text]) for text in texts]
        return torch.stack([self.module["chars"](i).mean(0) for i in ids])  # (B, 8)

    def score_pairs(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return (self.module["vision"](pixels) * self._text(texts)).sum(-1)  # (B,)

    def text_target(self, text: str, similarity: str = "cosine") -> str:
        return text

    def similarity(self, pixels: torch.Tensor, target: str, similarity: str = "cosine") -> torch.Tensor:
        return self.score_pairs(pixels, [target] * pixels.shape[0])
