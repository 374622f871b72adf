"""Fine-tuning on (inverted image, "A <name> is <description>.") pairs with InfoNCE."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ktpipe.captions import CaptionsError, ConceptText, finetune_caption, read_concepts
from ktpipe.invert import concept_seed, load_inversion
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


@dataclass(frozen=True)
class TrainingSet:
    pixels: torch.Tensor  # (N, 3, S, S) in [0, 1]
    labels: torch.Tensor  # (N,) index into captions
    captions: list[str]  # (K,) one fine-tuning caption per concept
    concepts: list[str]  # (K,) concept names, in caption order


def choose_concepts(concepts: list[ConceptText], cfg: FinetuneParams) -> list[ConceptText]:
    """The novel concepts a recipe learns (`cfg.concepts`, or all), plus known ones when rehearsing.

    Keeps the order of `concepts`; a recipe concept that is not novel is an error.
    """
    novel = {c.name for c in concepts if c.role == "novel"}
    if cfg.concepts is not None:
        not_novel = [n for n in cfg.concepts if n not in novel]
        if not_novel:
            raise CaptionsError(f"recipe concepts {not_novel} are not novel concepts of params 'concepts'; "
                                f"novel: {sorted(novel)}")
        novel = set(cfg.concepts)
    chosen = [c for c in concepts if c.name in novel or (cfg.rehearsal and c.role == "known")]
    if not any(c.name in novel for c in chosen):
        raise CaptionsError("no concept with role 'novel' to learn: params 'concepts' (or the recipe's) has none")
    return chosen


def noise_images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) uniform random pixels in [0, 1): the ablation's stand-in for inversions."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def concept_images(params: Params, cfg: FinetuneParams, name: str, inverted_dir: Path,
                   image_size: int | None) -> torch.Tensor:
    """A concept's inverted images, or (images: noise) as many seeded uniform-noise images."""
    if cfg.images == "inverted":
        return load_inversion(Path(inverted_dir) / name)
    if image_size is None:
        raise ValueError("noise images need the model's input size (training_set image_size)")
    return noise_images(params.invert.samples, image_size, concept_seed(params.seed, f"noise/{name}"))


def training_set(params: Params, recipe: str, captions_dir: Path, inverted_dir: Path,
                 image_size: int | None = None) -> TrainingSet:
    """Images, labels and captions of a recipe's fine-tuning; `image_size` sizes noise images."""
    cfg = params.recipe(recipe)
    chosen = choose_concepts(read_concepts(captions_dir, params.concepts), cfg)
    images = [concept_images(params, cfg, c.name, inverted_dir, image_size) for c in chosen]
    labels = torch.cat([torch.full((len(x),), k) for k, x in enumerate(images)])
    captions = [finetune_caption(c, cfg.name_prefix) for c in chosen]
    return TrainingSet(torch.cat(images), labels, captions, [c.name for c in chosen])


def run_finetune(params: Params, recipe: str, captions_dir: Path, inverted_dir: Path,
                 out_dir: Path, log_path: Path) -> dict:
    """Fine-tune the base model with a recipe; write the checkpoint folder and a training log."""
    cfg = params.recipe(recipe)
    model = load_base_model(params.model)
    data = training_set(params, recipe, captions_dir, inverted_dir, model.image_size)
    lr = params.lr * cfg.lr_multiplier
    start = time.time()
    log = finetune(model, data.pixels, data.labels, data.captions, cfg, lr, params.seed)
    with atomic_dir(out_dir) as tmp:
        model.save(tmp)
    summary = {"recipe": recipe, "lr": lr, "base_lr": params.lr, "lr_multiplier": cfg.lr_multiplier,
               "images": cfg.images, "concepts": data.concepts, "config": dataclasses.asdict(cfg),
               "captions": data.captions, "n_images": int(data.pixels.shape[0]),
               "seconds": round(time.time() - start, 2), "log": log}
    write_json(log_path, summary)
    return summary
