"""Demo cross-encoder pretraining: a tiny ViLT learns the demo world on a CPU, with image-text
matching (ITM) and masked language modelling (MLM), as ViLT was pretrained.

As ViLT starts from an ImageNet ViT, the demo ViLT's patch embedding, position embeddings and
transformer blocks start from the pretrained demo CLIP's vision tower (`pretrain.init_from`);
its word embeddings start at random. Its vocabulary holds the world's words and the known
concepts' names; any other word (a novel concept's name, a made-up one) is spelled in letter
pieces, so a name never seen in pretraining has no token of its own.

Each step shows `batch_size` renders (captioned as demo pretraining captions them: known
concepts named by a template, the rest described or defined under a made-up name). ITM scores
each image against `candidates` captions: its own, for a named render the same caption with
another known name (so names must be read, not guessed from the template), and captions of
other renders of the batch. The loss is the cross-entropy of the own caption among the
candidates plus the balanced binary cross-entropy of match and mismatch; MLM masks 15% of the
own captions' words.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ktpipe.concepts import ConceptText, finetune_caption
from ktpipe.io import atomic_dir, write_json
from ktpipe.transfer.losses import itm_loss
from ktpipe.demo.vilt import build_demo_vilt, demo_vilt_config
from ktpipe.models.vilt import ViltCrossEncoder
from ktpipe.params import Params, ParamsError, PretrainParams
from ktpipe.demo.pretrain import image_batch, lr_at, matrix_decay_adamw
from ktpipe.templates import load_templates
from ktpipe.demo.world import World, add_article, load_demo_world, load_world


@dataclass
class CrossPretrainResult:
    model: ViltCrossEncoder
    log: list[dict]


def world_words(world: World, templates: list[str]) -> set[str]:
    """Whole words of the demo ViLT's vocabulary beside the packaged ones: the world's attribute
    values, the templates' words and the known concepts' names (novel names stay in letter pieces)."""
    words = set(world.shapes) | set(world.colors) | set(world.fills) | set(world.backgrounds)
    for template in templates:
        words |= set(re.findall(r"[a-z]+", template.replace("{}", " ").lower()))
    return words | {c.name.lower() for c in world.known()}


def candidate_captions(texts: list[str], n_named: int, known: list[str], k: int,
                       rng: np.random.Generator) -> list[list[str]]:
    """Each text's `k` candidates: itself first; for the first `n_named` (captions of known
    concepts), the same caption with another known name; then other captions of the batch."""
    patterns = {name: re.compile(rf"\b{re.escape(name)}\b") for name in known}
    out = []
    for i, text in enumerate(texts):
        candidates = [text]
        if i < n_named:
            name = next((n for n, pattern in patterns.items() if pattern.search(text)), None)
            others = [n for n in known if n != name]
            if name is not None and others:
                swap = others[rng.integers(len(others))]
                candidates.append(patterns[name].sub(swap, text))
        distinct = [t for t in texts if t != text]
        while len(candidates) < k and distinct:
            candidates.append(distinct[rng.integers(len(distinct))])
        out.append(candidates[:k])
    if any(len(c) < k for c in out):
        raise ParamsError(f"params key 'pretrain.candidates' ({k}) needs batches with at least {k} distinct captions")
    return out


def define_known(texts: list[str], n_named: int, world: World, share: float, rng: np.random.Generator) -> list[str]:
    """A `share` of the first `n_named` captions (a known concept named by a template) replaced by
    the concept's definition, "A lantern is a solid orange hexagon.": the same name, read in the
    form fine-tuning captions take."""
    concepts = world.known()
    patterns = [re.compile(rf"\b{re.escape(c.name)}\b") for c in concepts]
    out = list(texts)
    for i in range(n_named):
        if rng.random() < share:
            k = next((k for k, pattern in enumerate(patterns) if pattern.search(texts[i])), None)
            if k is not None:
                c = concepts[k]
                out[i] = finetune_caption(ConceptText(c.name, add_article(f"{c.fill} {c.color} {c.shape}")))
    return out


def cross_pretrain_step(model, world: World, templates: list[str], cfg: PretrainParams, rng: np.random.Generator,
                        size: int, masker) -> dict:
    """One step's losses (not yet backpropagated): ITM over the candidates, MLM on own captions."""
    pixels, texts = image_batch(world, templates, cfg, rng, size)
    n_named = int(round(cfg.concept_fraction * cfg.batch_size))
    if cfg.known_definitions:
        texts = define_known(texts, n_named, world, cfg.known_definitions, rng)
    candidates = candidate_captions(texts, n_named, [c.name for c in world.known()], cfg.candidates, rng)
    k = cfg.candidates
    flat = [t for c in candidates for t in c]
    logits = model.score_pairs(pixels.repeat_interleave(k, 0), flat).view(len(texts), k)
    own = torch.zeros(len(texts), dtype=torch.long, device=logits.device)  # each image's caption comes first
    rank_loss = F.cross_entropy(logits, own)
    match_loss = itm_loss(logits, own)
    out = {"rank_loss": rank_loss, "match_loss": match_loss, "loss": rank_loss + match_loss}
    if cfg.mlm_weight:
        out["mlm_loss"] = model.masked_word_loss(pixels, masker(texts))
        out["loss"] = out["loss"] + cfg.mlm_weight * out["mlm_loss"]
    return out


def pretrain_cross(world: World, templates: list[str], cfg: PretrainParams, seed: int = 0, size: int = 32,
                   vision_init: Path | None = None, progress: bool = True) -> CrossPretrainResult:
    """Pretrain the demo ViLT on fresh renders of the world every step."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_demo_vilt(world_words(world, templates), vision_init)
    masker = model.word_masker(seed)
    optimizer = matrix_decay_adamw(model.module, cfg)
    model.module.train()
    log = []
    bar = tqdm(range(cfg.steps), desc="pretrain demo cross-encoder", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        losses = cross_pretrain_step(model, world, templates, cfg, rng, size, masker)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        record = {"step": step, **{k: round(v.item(), 5) for k, v in losses.items()}}
        log.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
    model.module.eval()
    return CrossPretrainResult(model, log)


def run_pretrain_cross(params: Params, out_dir: Path, log_path: Path, world_path: Path | None = None) -> dict:
    """Pretrain the demo cross-encoder on the world of `world_path` (None: the packaged world
    without named concepts); save a transformers checkpoint folder and a loss log."""
    start = time.time()
    templates = load_templates(params.evaluate.templates)
    world = load_demo_world(world_path) if world_path is not None else load_world()
    vision_init = Path(params.pretrain.init_from) if params.pretrain.init_from else None
    size = demo_vilt_config()["image_size"]  # renders at the model's own input size
    result = pretrain_cross(world, templates, params.pretrain, params.seed, size, vision_init)
    with atomic_dir(out_dir) as tmp:
        result.model.save(tmp)
    summary = {"seconds": round(time.time() - start, 1), "final": result.log[-1], "log": result.log}
    write_json(log_path, summary)
    return summary
