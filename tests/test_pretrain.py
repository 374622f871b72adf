"""Demo pretraining learns: the loss falls below chance, the weights move, renders match their captions."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import DEMO_CONCEPTS_FILE
from ktpipe.concepts import load_concepts_file, world_concepts
from ktpipe.models import OpenClipModel
from ktpipe.params import PretrainParams
from ktpipe.demo.pretrain import image_batch, pretrain
from ktpipe.templates import load_templates
from ktpipe.demo.world import load_world

CFG = PretrainParams(steps=80, batch_size=32, name_batch=8, warmup=10, lr=1e-3)


@pytest.fixture(scope="module")
def world():
    return load_world(concepts=world_concepts(load_concepts_file(DEMO_CONCEPTS_FILE)))


def caption_margin(model: OpenClipModel, world, templates) -> float:
    """Mean similarity of renders to their own captions minus to the other captions."""
    pixels, texts = image_batch(world, templates, dataclasses.replace(CFG, batch_size=64), np.random.default_rng(7), 32)
    with torch.no_grad():
        sims = model.encode_images(pixels) @ model.encode_texts(texts).T
    same = torch.tensor([[a == b for b in texts] for a in texts])
    return (sims[same].mean() - sims[~same].mean()).item()


def test_pretraining_learns_to_match_renders_and_captions(world):
    templates = load_templates("demo")
    start = pretrain(world, templates, dataclasses.replace(CFG, steps=0), progress=False).model
    result = pretrain(world, templates, CFG, progress=False)
    losses = [r["image_loss"] for r in result.log]
    chance = np.log(CFG.batch_size)  # the loss of embeddings that tell the batch's pairs apart no better than chance
    assert min(losses) > 0 and np.mean(losses[-10:]) < min(chance, np.mean(losses[:10])) - 0.2
    moved = [
        (a - b).norm() / b.norm()
        for a, b in zip(result.model.module.visual.parameters(), start.module.visual.parameters())
        if b.ndim >= 2
    ]
    assert min(moved) > 0.05  # every visual matrix moved, far beyond 80 steps of decay (< 1%)
    assert caption_margin(result.model, world, templates) > caption_margin(start, world, templates) + 0.05
