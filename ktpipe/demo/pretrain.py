"""Demo pretraining: a tiny CLIP learns the demo world from scratch on a CPU.

Beyond the paper, an optional text-only objective matches "a photo of a X." with
"A X is a <description>." for made-up names X, so the text encoder learns to carry an unseen
name through both forms; token embeddings stay at their random init, so a novel name's tokens
look like any made-up name's. The novel concepts' names and attribute combinations never
appear in pretraining data.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ktpipe.concepts import ConceptText, finetune_caption
from ktpipe.io import atomic_dir, write_json
from ktpipe.models import OpenClipModel, build_demo_model
from ktpipe.params import Params, ParamsError, PretrainParams
from ktpipe.templates import load_templates
from ktpipe.demo.world import (Attributes, World, concept_attributes, describe, load_demo_world, load_world, render_batch,
                          sample_attributes)

SYLLABLE_ONSETS = "b c d f g h j k l m n p r s t v z br dr gl kr pl st tr sk".split()
SYLLABLE_VOWELS = "a e i o u ai ou".split()
SYLLABLE_CODAS = ["", "", "n", "r", "t", "x", "k", "m"]
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class PretrainResult:
    model: OpenClipModel
    log: list[dict]


def pick(options: list[str], rng: np.random.Generator) -> str:
    """One of `options`, uniformly: the draw `rng.choice(options)` makes, without its conversion
    of the list to an array (six times faster; pretraining draws thousands of syllables a step)."""
    return options[rng.integers(len(options))]


def made_up_names(rng: np.random.Generator, n: int, forbidden: set[str]) -> list[str]:
    """Random pronounceable names (2-3 syllables) that are none of `forbidden`."""
    names: list[str] = []
    while len(names) < n:
        syllables = [pick(SYLLABLE_ONSETS, rng) + pick(SYLLABLE_VOWELS, rng) + pick(SYLLABLE_CODAS, rng)
                     for _ in range(rng.integers(2, 4))]
        name = "".join(syllables)
        if name not in forbidden:
            names.append(name)
    return names


def multi_positive_clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, groups: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric contrastive loss where pairs sharing a group id (same caption) are all positives.

    image_emb, text_emb (B, D) L2-normalized; groups (B,) int. Targets spread uniformly over
    the positives, so duplicate captions in a batch are not pushed apart as negatives.
    """
    logits = logit_scale * image_emb @ text_emb.T  # (B, B)
    positives = (groups[:, None] == groups[None, :]).float()
    targets = positives / positives.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def group_ids(texts: list[str]) -> torch.Tensor:
    """(B,) ids equal where the texts are equal."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(t, len(index)) for t in texts])


@dataclass(frozen=True)
class RenderPool:
    """Renders made once per run (`pretrain.pool_size`); each step draws from them and writes
    fresh captions, so rendering costs a fraction of what a new batch every step does."""

    named: torch.Tensor  # (Nk, 3, S, S) renders of known concepts
    named_concept: list[int]  # (Nk,) index into world.known()
    described: torch.Tensor  # (Nd, 3, S, S) renders of any non-novel combination
    described_attrs: list[Attributes]  # (Nd,) what each described render shows


def build_pool(world: World, cfg: PretrainParams, rng: np.random.Generator, size: int) -> RenderPool:
    """`cfg.pool_size` renders, split between known concepts and described ones as batches are."""
    n_named = int(round(cfg.concept_fraction * cfg.pool_size))
    known = world.known()
    concept_ids = [int(k) for k in rng.integers(0, len(known), n_named)]
    named = [a for k in concept_ids for a in concept_attributes(known[k], world, rng, 1)]
    described = sample_attributes(world, rng, cfg.pool_size - n_named, exclude_novel=True)
    return RenderPool(render_batch(named, world, rng, size), concept_ids,
                      render_batch(described, world, rng, size), described)


def caption_described(a: Attributes, name: str, cfg: PretrainParams, rng: np.random.Generator) -> str:
    """A described render's caption: its definition under a made-up name, or its description."""
    if rng.random() < cfg.definition_fraction:
        return finetune_caption(ConceptText(name, describe(a, with_background=False)))
    return describe(a, with_background=bool(rng.random() < 0.5))


def image_batch(world: World, templates: list[str], cfg: PretrainParams, rng: np.random.Generator, size: int,
                pool: RenderPool | None = None):
    """Renders with captions: known concepts named by a template, the rest described.

    A `definition_fraction` of the described renders is captioned "A X is a <description>."
    with a fresh made-up X, so definitions carry their description's visual content. With a
    `pool` the renders are drawn from it; without, they are rendered anew.
    """
    n_named = int(round(cfg.concept_fraction * cfg.batch_size))
    n_described = cfg.batch_size - n_named
    known = world.known()
    picks = rng.integers(0, len(known) if pool is None else len(pool.named_concept), n_named)
    attrs, texts = [], []
    for i in picks:  # the draws stay in this order: it fixes the demo model's weights
        k = i if pool is None else pool.named_concept[i]
        if pool is None:
            attrs += concept_attributes(known[k], world, rng, 1)
        texts.append(templates[rng.integers(len(templates))].format(known[k].name))
    if pool is None:
        described = sample_attributes(world, rng, n_described, exclude_novel=True)
    else:
        described_picks = rng.integers(0, len(pool.described_attrs), n_described)
        described = [pool.described_attrs[i] for i in described_picks]
    names = iter(made_up_names(rng, len(described), set(world.concepts)))
    for a in described:
        attrs.append(a)
        texts.append(caption_described(a, next(names), cfg, rng))
    if pool is not None:
        return torch.cat([pool.named[picks], pool.described[described_picks]]), texts
    return render_batch(attrs, world, rng, size), texts


def name_batch(world: World, templates: list[str], cfg: PretrainParams, rng: np.random.Generator):
    """Text pairs ("a photo of a X.", "A X is a <description>.") for made-up names X."""
    forbidden = set(world.concepts)
    names = made_up_names(rng, cfg.name_batch, forbidden)
    described = sample_attributes(world, rng, cfg.name_batch, exclude_novel=True)
    anchors = [templates[rng.integers(len(templates))].format(n) for n in names]
    definitions = [
        finetune_caption(ConceptText(n, describe(a, with_background=False))) for n, a in zip(names, described)
    ]
    return anchors, definitions


def lr_at(step: int, cfg: PretrainParams) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


def matrix_decay_adamw(module: torch.nn.Module, cfg: PretrainParams) -> torch.optim.Optimizer:
    """AdamW over the module's trainable parameters, weight decay on matrices only (every demo
    pretraining: CLIP, ViLT, CoCa)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_pretrain_optimizer(model: OpenClipModel, cfg: PretrainParams) -> torch.optim.Optimizer:
    """`matrix_decay_adamw`, with token embeddings optionally frozen at random init."""
    if cfg.freeze_token_embedding:
        model.module.token_embedding.weight.requires_grad_(False)
    return matrix_decay_adamw(model.module, cfg)


def pretrain_step(model, world, templates, cfg, rng, size, pool: RenderPool | None = None) -> dict:
    """One step's losses (not yet backpropagated)."""
    pixels, texts = image_batch(world, templates, cfg, rng, size, pool)
    scale = model.logit_scale()
    image_loss = multi_positive_clip_loss(
        model.encode_images(pixels), model.encode_texts(texts), group_ids(texts), scale
    )
    out = {"image_loss": image_loss, "loss": image_loss}
    if cfg.name_objective:
        anchors, definitions = name_batch(world, templates, cfg, rng)
        name_loss = multi_positive_clip_loss(
            model.encode_texts(anchors), model.encode_texts(definitions), group_ids(anchors), scale
        )
        out["name_loss"] = name_loss
        out["loss"] = image_loss + cfg.name_weight * name_loss
    return out


def pretrain(
    world: World, templates: list[str], cfg: PretrainParams, seed: int = 0, size: int = 32, progress: bool = True
) -> PretrainResult:
    """Pretrain the demo model from scratch on renders of the world: fresh ones every step, or
    (`cfg.pool_size` > 0) drawn from a pool rendered once, with fresh captions every step."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pool = build_pool(world, cfg, rng, size) if cfg.pool_size else None
    model = build_demo_model()
    optimizer = build_pretrain_optimizer(model, cfg)
    model.module.train()
    log = []
    bar = tqdm(range(cfg.steps), desc="pretrain demo model", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        losses = pretrain_step(model, world, templates, cfg, rng, size, pool)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        with torch.no_grad():
            model.module.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        record = {"step": step, **{k: round(v.item(), 5) for k, v in losses.items()}}
        log.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
    model.module.eval()
    return PretrainResult(model, log)


def run_pretrain(params: Params, out_dir: Path, log_path: Path, world_path: Path | None = None) -> dict:
    """Pretrain the demo model on the world of `world_path` (the concepts the concepts stage wrote;
    None: the packaged world without named concepts); save a checkpoint folder and a loss log."""
    if params.model.backend != "demo":
        raise ParamsError(
            f"the pretrain stage builds the demo model only; model.backend is {params.model.backend!r}. "
            "Real models are recorded by ktpipe.base_model instead."
        )
    start = time.time()
    templates = load_templates(params.evaluate.templates)
    world = load_demo_world(world_path) if world_path is not None else load_world()
    result = pretrain(world, templates, params.pretrain, params.seed, params.world.image_size)
    with atomic_dir(out_dir) as tmp:
        result.model.save(tmp)
    summary = {"seconds": round(time.time() - start, 1), "final": result.log[-1], "log": result.log}
    write_json(log_path, summary)
    return summary
