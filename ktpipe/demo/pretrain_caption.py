"""Demo captioner pretraining: a tiny open_clip CoCa learns to caption the demo world on a CPU.

As open_clip's CoCa adds a text decoder to a CLIP, the demo CoCa starts from the pretrained demo
CLIP (`pretrain.init_from`): its vision stem and blocks and its whole text tower are copied, and
the text tower stays frozen, so descriptions and definitions read as the demo CLIP reads them.
Its attentional pooler, projection and decoder start at random. Each step shows `batch_size`
fresh renders, a `concept_fraction` of them of known concepts, captioned as the captioning sets'
references are (`world.caption_references`): "a lantern on a gray background.", "a photo of a
lantern on a gray background.", "a gray background with a lantern.", "a photo of a lantern." or
"a lantern."; the rest of any other non-novel combination, captioned the same ways with what they
show ("an outlined red circle on a gray background."). The loss is
open_clip's CoCaLoss: the contrastive loss (weight 1) plus `caption_weight` times the captioning
loss. A novel concept's name is never seen, so the model cannot say it before transfer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ktpipe.io import atomic_dir, write_json
from ktpipe.models.coca import OpenClipCaptioner
from ktpipe.demo.models import DEMO_COCA_ARCH, build_demo_coca, demo_config, demo_vocabulary
from ktpipe.params import Params, PretrainParams
from ktpipe.demo.pretrain import MAX_LOGIT_SCALE, lr_at, matrix_decay_adamw, pick
from ktpipe.templates import packaged_templates
from ktpipe.demo.world import (Attributes, World, add_article, caption_references, concept_attributes, load_demo_world, load_world,
                          render_batch, sample_attributes)


@dataclass
class CaptionPretrainResult:
    model: OpenClipCaptioner
    log: list[dict]


def world_texts(world: World) -> list[str]:
    """Every text the demo CoCa reads or writes, for its vocabulary: the world's words, every
    concept's name in the reference captions, in its definition and in every packaged template
    (the fine-tuning target captions among them)."""
    texts = [" ".join([*world.shapes, *world.colors, *world.fills])]
    for name in ["thing", *world.concepts]:
        thing = name.replace("_", " ")
        texts.append(f"A {thing} is {add_article(thing)}.")
        texts += [t for background in world.backgrounds
                  for t in caption_references(name, Attributes("", "", "", background))]
        texts += [template.format(thing) for template in packaged_templates()]
    return texts


def caption_batch(world: World, cfg: PretrainParams, rng: np.random.Generator, size: int):
    """Fresh renders and one reference-style caption each: known concepts by name, the rest by
    what they show."""
    n_named = int(round(cfg.concept_fraction * cfg.batch_size))
    known = world.known()
    attrs, things = [], []
    for k in rng.integers(0, len(known), n_named):
        attrs += concept_attributes(known[k], world, rng, 1)
        things.append(known[k].name)
    for a in sample_attributes(world, rng, cfg.batch_size - n_named, exclude_novel=True):
        attrs.append(a)
        things.append(f"{a.fill} {a.color} {a.shape}")
    captions = [pick(caption_references(thing, a), rng) for thing, a in zip(things, attrs)]
    return render_batch(attrs, world, rng, size), captions


def pretrain_captioner(world: World, cfg: PretrainParams, seed: int = 0, size: int = 32,
                       init_from: Path | None = None, progress: bool = True) -> CaptionPretrainResult:
    """Pretrain the demo CoCa (text tower frozen) with open_clip's CoCaLoss on fresh renders."""
    import open_clip

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_demo_coca(demo_vocabulary(world_texts(world)), init_from)
    for p in model.module.text.parameters():
        p.requires_grad_(False)
    optimizer = matrix_decay_adamw(model.module, cfg)
    loss_fn = open_clip.CoCaLoss(caption_loss_weight=cfg.caption_weight, clip_loss_weight=1.0, pad_id=model.pad_id)
    model.module.train()
    log = []
    bar = tqdm(range(cfg.steps), desc="pretrain demo captioner", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        pixels, captions = caption_batch(world, cfg, rng, size)
        contrastive, captioning = loss_fn(**model.caption_loss_inputs(pixels, captions, captions))
        loss = contrastive + captioning
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.module.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        record = {"step": step, "loss": round(loss.item(), 5), "contrastive_loss": round(contrastive.item(), 5),
                  "caption_loss": round(captioning.item() / max(cfg.caption_weight, 1e-12), 5)}
        log.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
    model.module.eval()
    return CaptionPretrainResult(model, log)


def run_pretrain_captioner(params: Params, out_dir: Path, log_path: Path, world_path: Path | None = None) -> dict:
    """Pretrain the demo CoCa on the world of `world_path` (None: the packaged world without named
    concepts); save an open_clip checkpoint folder and a loss log."""
    start = time.time()
    world = load_demo_world(world_path) if world_path is not None else load_world()
    init_from = Path(params.pretrain.init_from) if params.pretrain.init_from else None
    size = demo_config(DEMO_COCA_ARCH)["vision_cfg"]["image_size"]
    result = pretrain_captioner(world, params.pretrain, params.seed, size, init_from)
    with atomic_dir(out_dir) as tmp:
        result.model.save(tmp)
    summary = {"seconds": round(time.time() - start, 1), "final": result.log[-1], "log": result.log}
    write_json(log_path, summary)
    return summary
