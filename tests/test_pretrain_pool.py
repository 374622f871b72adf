"""Demo pretraining from a render pool (`pretrain.pool_size`): renders made once, captions anew."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import ktpipe.demo.pretrain as pretrain_module
from conftest import DEMO_CONCEPTS_FILE
from ktpipe.concepts import load_concepts_file, world_concepts
from ktpipe.params import PretrainParams
from ktpipe.demo.pretrain import build_pool, image_batch, pretrain
from ktpipe.templates import load_templates
from ktpipe.demo.world import load_world

CFG = PretrainParams(batch_size=20, pool_size=40, concept_fraction=0.3, definition_fraction=0.5)


@pytest.fixture(scope="module")
def world():
    return load_world(concepts=world_concepts(load_concepts_file(DEMO_CONCEPTS_FILE)))


def test_pool_splits_like_a_batch_and_keeps_novel_combinations_out(world):
    pool = build_pool(world, CFG, np.random.default_rng(0), 16)
    assert pool.named.shape == (12, 3, 16, 16) and pool.described.shape == (28, 3, 16, 16)
    assert len(pool.named_concept) == 12 and len(pool.described_attrs) == 28
    novel = {(c.shape, c.color, c.fill) for c in world.novel()}
    assert not any((a.shape, a.color, a.fill) in novel for a in pool.described_attrs)


def test_batches_draw_pool_renders_with_fresh_captions(world):
    templates = load_templates("demo")
    pool = build_pool(world, CFG, np.random.default_rng(0), 16)
    rendered = {tuple(x.flatten().tolist()) for x in torch.cat([pool.named, pool.described])}
    rng = np.random.default_rng(1)
    first_pixels, first_texts = image_batch(world, templates, CFG, rng, 16, pool)
    second_pixels, second_texts = image_batch(world, templates, CFG, rng, 16, pool)
    assert first_pixels.shape == (20, 3, 16, 16)
    assert all(tuple(x.flatten().tolist()) in rendered for x in torch.cat([first_pixels, second_pixels]))
    known = {c.name for c in world.known()}
    assert all(any(name in text for name in known) for text in first_texts[:6])  # named by a template
    assert first_texts != second_texts  # new draws and new captions every step


def test_pool_renders_each_image_once(world, monkeypatch):
    calls = []
    render_batch = pretrain_module.render_batch

    def counting(attrs, *args, **kwargs):
        calls.append(len(attrs))
        return render_batch(attrs, *args, **kwargs)

    monkeypatch.setattr(pretrain_module, "render_batch", counting)
    cfg = dataclasses.replace(CFG, steps=3, name_batch=4, warmup=1)
    result = pretrain(world, load_templates("demo"), cfg, seed=0, size=32, progress=False)
    assert calls == [12, 28]  # the pool, and no render per step
    assert len(result.log) == 3 and all(r["loss"] > 0 for r in result.log)
    calls.clear()
    pretrain(world, load_templates("demo"), dataclasses.replace(cfg, pool_size=0), seed=0, size=32, progress=False)
    assert calls == [20, 20, 20]  # without a pool, every step renders its batch


def test_negative_pool_size_is_rejected():
    from ktpipe.params import Params, ParamsError, build_section, validate

    with pytest.raises(ParamsError, match="pretrain.pool_size"):
        validate(build_section(Params, {"pretrain": {"pool_size": -1}}))
