"""Every ViLT preset's objective learns: one optimizer step of `finetune`, as the recipe configures
it, on a random-init ViLT-B/32 at its real input size (384 px, tests/archs.py `VILT_B32`, with
ITM and MLM heads as dandelin/vilt-b32-mlm-itm has them).

As tests/test_preset_learning.py does for CLIP, with one synthetic image per concept (a smooth
random image standing in for an inversion; `noise_images` for `images: noise`), the recipe's
optimizer settings and its real lr, one step must:

1. give a finite, positive first-step loss;
2. move the trainable weights because of the loss: against a control step whose loss is
   multiplied by 0 (AdamW's decoupled weight decay alone), sum |w_real - w_control| is positive
   and above LOSS_SHARE_MIN times sum |w_control - w_0| (at table5's lr 9e-7 the decay-only
   step, w * lr * 0.01, rounds to nothing in float32);
3. lower the objective itself, in eval mode on the same batch (ViLT-B/32 has no dropout): image-
   text matching's loss (own caption to match, the others to no match), or the masked-word loss
   on the captions masked alike. The own caption's match-logit margin is printed beside it: at
   table5's lr 9e-7 one step moves it by about 1e-4 either way, below what a test can assert.

A preset's recipes differ only by concept and image kind within one objective (table1_vilt's
three concepts; table11's implicit recipes on noise and explicit ones on inversions, which reach
the objective as the same pixel tensor), so the first recipe of each (preset, objective) runs.
table5_vilt_flickr learns 80 concepts in one recipe: its step runs on the first two (every
image against 2 captions) instead of 64,000 image-caption pairs.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import ktpipe.transfer.finetune
import ktpipe.transfer.losses
from archs import VILT_B32
from conftest import REPO
from test_preset_learning import synthetic_images, trainable_named  # the CLIP presets' stand-ins
from ktpipe.concepts import finetune_caption, load_concepts_file
from ktpipe.transfer.finetune import choose_concepts, finetune
from ktpipe.transfer.losses import itm_loss
from ktpipe.models import load_model
from ktpipe.params import load_params

IMAGES_PER_CONCEPT = 1  # ViLT-B/32 costs about 0.5 s per image-caption pair forward and backward here
MAX_CONCEPTS = 2  # captions per step: a recipe's first concepts, then other concepts' as mismatches
LOSS_SHARE_MIN = 0.5


def vilt_cases() -> list:
    """(preset, recipe): the first recipe of each objective of every ViLT preset."""
    cases = []
    for path in sorted((REPO / "presets").glob("*.yaml")):
        params = load_params(path)
        if params.model.backend != "vilt":
            continue
        seen = set()
        for recipe in params.recipes:
            cfg = params.recipe(recipe)
            if cfg.loss not in seen:
                seen.add(cfg.loss)
                cases.append(pytest.param(path.stem, recipe, id=f"{path.stem}-{recipe}"))
    return cases


@pytest.fixture(scope="module")
def vilt(random_checkpoint):
    model = load_model("vilt", f"local-dir:{random_checkpoint(VILT_B32)}", device="cpu")
    return model, {k: v.detach().clone() for k, v in model.module.state_dict().items()}


@torch.no_grad()
def objective_loss(model, cfg, pixels, labels, texts, seed) -> tuple[float, float | None]:
    """The recipe's objective on the batch in eval mode (ViLT-B/32 has no dropout: the loss the step
    minimized), and for image-text matching the margin of the own caption's mean match logit over
    the other captions'. The masked-word loss masks the captions as a fresh masker of the seed does."""
    model.module.eval()
    if cfg.loss == "itm":
        scores = model.score_targets(pixels, model.text_targets(texts))
        own = F.one_hot(labels, len(texts)).bool()
        return itm_loss(scores, labels).item(), (scores[own].mean() - scores[~own].mean()).item()
    masked = model.word_masker(seed)([texts[int(k)] for k in labels])
    return model.masked_word_loss(pixels, masked).item(), None


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "recipe"), vilt_cases())
def test_one_step_of_vilt_preset_recipe_learns(preset, recipe, vilt):
    params = load_params(REPO / "presets" / f"{preset}.yaml")
    cfg = params.recipe(recipe)
    model, initial = vilt
    assert model.image_size == 384
    texts = load_concepts_file(REPO / params.concepts.file)
    every = [texts[n] for n in params.concepts.names]
    concepts = choose_concepts(every, cfg)[:MAX_CONCEPTS]
    captions = [finetune_caption(c, cfg.name_prefix) for c in concepts]
    negatives = [finetune_caption(c, cfg.name_prefix) for c in every if c not in concepts][:MAX_CONCEPTS - len(concepts)]
    pixels = torch.cat([synthetic_images(cfg, c.name, 384, IMAGES_PER_CONCEPT, params.invert.init) for c in concepts])
    labels = torch.arange(len(concepts)).repeat_interleave(IMAGES_PER_CONCEPT)
    step_cfg = dataclasses.replace(cfg, epochs=1, batch_size=len(pixels))
    lr = params.recipe_lr(recipe)
    run = dict(pixels=pixels, labels=labels, captions=captions, cfg=step_cfg, lr=lr, seed=params.seed,
               recipe=recipe, negatives=negatives, progress=False)
    texts_scored = [*captions, *negatives] if cfg.loss == "itm" else captions
    try:
        original = ktpipe.transfer.losses.FINETUNE_LOSSES[cfg.loss]
        zeroed = dataclasses.replace(original, loss=lambda *args: 0 * original.loss(*args))
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(ktpipe.transfer.finetune.FINETUNE_LOSSES, cfg.loss, zeroed)
            assert finetune(model, **run)[0]["loss"] == 0
        control = {n: p.detach().clone() for n, p in trainable_named(model, cfg).items()}
        model.module.load_state_dict(initial)
        before, margin_before = objective_loss(model, cfg, pixels, labels, texts_scored, params.seed)
        log = finetune(model, **run)
        trained = trainable_named(model, cfg)
        loss_change = sum((p.detach() - control[n]).norm().item() for n, p in trained.items())
        decay_change = sum((control[n] - initial[n]).norm().item() for n in trained)
        after, margin_after = objective_loss(model, cfg, pixels, labels, texts_scored, params.seed)
        untrained = [n for n, p in model.module.named_parameters() if n not in trained]
        frozen_kept = all(torch.equal(model.module.state_dict()[n], initial[n]) for n in untrained)
    finally:
        model.module.load_state_dict(initial)
    print(f"\n{preset} {recipe} loss={log[0]['loss']:.4f} loss change={loss_change:.3g} decay change="
          f"{decay_change:.3g} objective {before:.6f} -> {after:.6f} own-caption margin {margin_before} -> {margin_after}")
    assert len(log) == 1 and math.isfinite(log[0]["loss"]) and log[0]["loss"] > 0
    # At lr 9e-7 and decay 0.01 the decay-only step rounds to nothing in float32: then any move is the loss's.
    assert loss_change > 0 and loss_change > LOSS_SHARE_MIN * decay_change, (
        f"the loss changed the step by {loss_change:.3g}, the decay-only step moved {decay_change:.3g}")
    assert after < before, f"{cfg.loss} objective did not fall: {before:.6f} -> {after:.6f}"
    assert frozen_kept  # what the recipe's towers leave out did not move
