"""Fine-tuning on (inverted image, "A <name> is <description>.") pairs with InfoNCE."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ktpipe.captions import CaptionsError, finetune_caption, read_concepts
from ktpipe.invert import load_inversion
from ktpipe.io import atomic_dir, write_json
from ktpipe.losses import info_nce
from ktpipe.models import ImageTextModel, load_base_model
from ktpipe.params import FinetuneParams, Params


def set_trainable(model: ImageTextModel, towers: str, visual_layers: int | None = None) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze the chosen towers; returns the trainable parameters."""
    for p in model.module.parameters():
        p.requires_grad_(False)
    params = list(model.tower_parameters(towers, visual_layers))
    for p in params:
        p.requires_grad_(True)
    return params


def build_optimizer(params: list[torch.nn.Parameter], cfg: FinetuneParams, lr: float) -> torch.optim.Optimizer:
    """Adam with L2 decay or AdamW with decoupled decay (CLIP's choice)."""
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(params, lr=lr, weight_decay=cfg.weight_decay)


def finetune(
    model: ImageTextModel,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    captions: list[str],
    cfg: FinetuneParams,
    lr: float,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Train `cfg.towers` for `cfg.epochs` on pixels (N, 3, S, S) whose labels (N,) index captions.

    Every step contrasts the batch's images against all captions (Eq. 2), so even a batch
    that holds a single concept still gets a gradient. Returns the per-step log.
    """
    if pixels.shape[0] == 0:
        raise ValueError("no images to fine-tune on")
    trainable = set_trainable(model, cfg.towers, cfg.visual_layers)
    optimizer = build_optimizer(trainable, cfg, lr)
    generator = torch.Generator().manual_seed(seed)
    text_trains = cfg.towers in ("text", "both")
    model.module.train()
    with torch.no_grad():
        frozen_text = None if text_trains else model.encode_texts(captions)  # (K, D)
    scale = cfg.logit_scale if cfg.logit_scale is not None else model.logit_scale().detach()
    log, step = [], 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(pixels.shape[0], generator=generator)
        batches = order.split(cfg.batch_size)
        for batch in tqdm(batches, desc=f"finetune epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False):
            text_emb = model.encode_texts(captions) if text_trains else frozen_text
            image_emb = model.encode_images(pixels[batch])
            loss = info_nce(image_emb, text_emb, labels[batch].to(image_emb.device), scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            log.append({"step": step, "epoch": epoch, "loss": round(loss.item(), 6)})
            step += 1
    model.module.eval()
    return log


def training_set(params: Params, recipe: str, captions_dir: Path, inverted_dir: Path):
    """Pixels (N, 3, S, S), labels (N,) and captions (K) for a recipe's fine-tuning."""
    cfg = params.recipe(recipe)
    concepts = read_concepts(captions_dir, params.concepts)
    chosen = [c for c in concepts if c.role == "novel" or (cfg.rehearsal and c.role == "known")]
    if not any(c.role == "novel" for c in chosen):
        raise CaptionsError("no concept with role 'novel' in params 'concepts': nothing to learn")
    images = [load_inversion(Path(inverted_dir) / c.name) for c in chosen]
    labels = torch.cat([torch.full((len(x),), k) for k, x in enumerate(images)])
    captions = [finetune_caption(c, cfg.name_prefix) for c in chosen]
    return torch.cat(images), labels, captions


def run_finetune(params: Params, recipe: str, captions_dir: Path, inverted_dir: Path,
                 out_dir: Path, log_path: Path) -> dict:
    """Fine-tune the base model with a recipe; write the checkpoint folder and a training log."""
    cfg = params.recipe(recipe)
    pixels, labels, captions = training_set(params, recipe, captions_dir, inverted_dir)
    model = load_base_model(params.model)
    start = time.time()
    log = finetune(model, pixels, labels, captions, cfg, params.lr, params.seed)
    with atomic_dir(out_dir) as tmp:
        model.save(tmp)
    summary = {"recipe": recipe, "lr": params.lr, "config": dataclasses.asdict(cfg), "captions": captions,
               "n_images": int(pixels.shape[0]), "seconds": round(time.time() - start, 2), "log": log}
    write_json(log_path, summary)
    return summary
