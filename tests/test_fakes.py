"""The capability interfaces take a model family the code has never seen: a fake cross-encoder
(tests/fakes.py) is inverted through the same `invert_text`, with no branch added for it."""
from __future__ import annotations

import torch

from fakes import FakeCrossEncoder
from ktpipe.invert import invert_text
from ktpipe.models import EmbedsImages, EmbedsTexts, Invertible, ScoresPairs
from ktpipe.params import InvertParams


def test_a_cross_encoder_has_only_the_capabilities_it_implements():
    fake = FakeCrossEncoder()
    assert isinstance(fake, Invertible) and isinstance(fake, ScoresPairs)
    assert not isinstance(fake, EmbedsTexts) and not isinstance(fake, EmbedsImages)


def test_inversion_raises_a_cross_encoders_match_score():
    fake = FakeCrossEncoder()
    cfg = InvertParams(steps=25, samples=3, lr=0.1)
    start = torch.rand(cfg.samples, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = fake.similarity(start, "a blicket").mean()
    pixels, scores = invert_text(fake, "a blicket", cfg, seed=5, progress=False, name="blicket")
    assert pixels.shape == (3, 3, 16, 16) and scores.shape == (3,)
    assert scores.mean() > before + 0.03  # measured: -0.033 -> 0.032
    with torch.no_grad():
        torch.testing.assert_close(scores, fake.similarity(pixels, "a blicket"))
