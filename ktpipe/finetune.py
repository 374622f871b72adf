"""Fine-tuning on (inverted image, "A <name> is <description>.") pairs with a contrastive objective.

The model is reached through its capabilities only (ktpipe.models.base): the objective asks it for
scores or embeddings (ktpipe.losses), `Trainable` names what trains and saves the checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ktpipe.concepts import ConceptsError, ConceptText, concept_seed, finetune_caption, read_concepts
from ktpipe.errors import KtpipeError, check_finite
from ktpipe.images import load_inversion
from ktpipe.io import atomic_dir, write_json
from ktpipe.losses import FINETUNE_LOSSES, distillation_loss
from ktpipe.models import EmbedsImages, EmbedsTexts, Trainable, load_base_model, require
from ktpipe.params import FinetuneParams, Params, ParamsError


def set_trainable(model: Trainable, towers: str, visual_layers: int | None = None) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze the chosen towers; returns the trainable parameters."""
    for p in model.module.parameters():
        p.requires_grad_(False)
    params = list(model.tower_parameters(towers, visual_layers))
    for p in params:
        p.requires_grad_(True)
    return params


def build_optimizer(params: list[torch.nn.Parameter], cfg: FinetuneParams, lr: float) -> torch.optim.Optimizer:
    """Adam with L2 decay or AdamW with decoupled decay (CLIP's choice), with the recipe's betas and eps."""
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(params, lr=lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps)


def check_objective(cfg: FinetuneParams, captions: list[str], recipe: str) -> None:
    """Eq. 2 contrasts an image only against the recipe's captions: with a single distinct caption
    its logits are (B, 1), the loss is 0 and nothing is learned, so refuse to start."""
    if cfg.loss == "eq2" and len(set(captions)) < 2:
        raise ParamsError(
            f"recipe {recipe!r}: finetune.loss 'eq2' needs at least two distinct captions, the recipe has "
            f"{len(set(captions))} ({captions[:1]}); its loss and gradient would be 0 at every step. "
            "Use loss 'authors' (contrasts the batch's images and captions), or learn more concepts together")


def frozen_copy(model: Trainable) -> Trainable:
    """An eval-mode copy of the model with no trainable parameter (the distillation teacher)."""
    teacher = copy.deepcopy(model)
    teacher.module.eval()
    for p in teacher.module.parameters():
        p.requires_grad_(False)
    return teacher


def frozen_text_targets(model: Any, captions: list[str], text_trains: bool) -> Any:
    """The captions' text targets (a dual encoder's (K, D) embeddings), computed once in eval mode
    (no text dropout), or None when the text tower trains and they are computed every step."""
    if text_trains:
        return None
    model.module.eval()
    with torch.no_grad():
        return model.text_targets(captions)


def check_capabilities(model: Any, cfg: FinetuneParams, recipe: str) -> None:
    """The recipe's objective, distillation and default temperature use only what the model has."""
    for capability in FINETUNE_LOSSES[cfg.loss].needs:
        require(model, capability, f"recipe {recipe!r}: finetune.loss {cfg.loss!r}")
    require(model, Trainable, f"recipe {recipe!r}: fine-tuning")
    if cfg.kd_weight > 0:
        require(model, EmbedsImages, f"recipe {recipe!r}: distillation (finetune.kd_weight)")
    if cfg.temperature is None:
        require(model, EmbedsTexts, f"recipe {recipe!r}: finetune.temperature null (the model's own)")


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter],
                  recipe: str, step: int) -> None:
    """Backpropagate and step, stopping on a non-finite loss or gradient before the weights change."""
    check_finite(loss, "loss", f"fine-tuning recipe {recipe!r}", step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad.norm() for p in trainable if p.grad is not None]
    if grads:
        check_finite(torch.stack(grads).sum(), "gradient norm", f"fine-tuning recipe {recipe!r}", step)
    optimizer.step()


def finetune(
    model: Any,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    captions: list[str],
    cfg: FinetuneParams,
    lr: float,
    seed: int = 0,
    progress: bool = True,
    recipe: str = "finetune",
) -> list[dict]:
    """Train `cfg.towers` for `cfg.epochs` on pixels (N, 3, S, S) whose labels (N,) index captions.

    The objective is `cfg.loss` (losses.FINETUNE_LOSSES) at `cfg.temperature` (None: the model's
    own), plus `cfg.kd_weight` times the distillation MSE to the frozen model. Returns the per-step log.
    """
    if pixels.shape[0] == 0:
        raise KtpipeError(f"recipe {recipe!r}: no images to fine-tune on")
    check_objective(cfg, captions, recipe)
    check_capabilities(model, cfg, recipe)
    objective = FINETUNE_LOSSES[cfg.loss].loss
    teacher = frozen_copy(model) if cfg.kd_weight > 0 else None
    trainable = set_trainable(model, cfg.towers, cfg.visual_layers)
    optimizer = build_optimizer(trainable, cfg, lr)
    generator = torch.Generator().manual_seed(seed)
    text_trains = cfg.towers in ("text", "both")
    frozen_targets = frozen_text_targets(model, captions, text_trains)
    temperature = cfg.temperature if cfg.temperature is not None else 1.0 / model.logit_scale().detach()
    model.module.train()
    log, step = [], 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(pixels.shape[0], generator=generator)
        batches = order.split(cfg.batch_size)
        for batch in tqdm(batches, desc=f"finetune {recipe} epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                          leave=False):
            targets = model.text_targets(captions) if text_trains else frozen_targets
            loss = objective(model, pixels[batch], targets, labels[batch], temperature)
            record = {"step": step, "epoch": epoch, "loss": round(loss.item(), 6)}
            if teacher is not None:
                with torch.no_grad():
                    teacher_emb = teacher.encode_images(pixels[batch])
                kd = distillation_loss(model.encode_images(pixels[batch]), teacher_emb)
                loss = loss + cfg.kd_weight * kd
                record["kd_loss"] = round(kd.item(), 8)
            backward_step(loss, optimizer, trainable, recipe, step)
            log.append(record)
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
            raise ConceptsError(f"recipe concepts {not_novel} are not novel concepts of params 'concepts'; "
                                f"novel: {sorted(novel)}")
        novel = set(cfg.concepts)
    chosen = [c for c in concepts if c.name in novel or (cfg.rehearsal and c.role == "known")]
    if not any(c.name in novel for c in chosen):
        raise ConceptsError("no concept with role 'novel' to learn: params 'concepts' (or the recipe's) has none")
    return chosen


def noise_images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) uniform random pixels in [0, 1): the ablation's stand-in for inversions."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def minmax_png(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) -> each image min-max scaled to [0, 1] and quantized to 8 bits, as the authors'
    inverted PNGs (torchvision `save_image(normalize=True, scale_each=True)`) hand them to fine-tuning."""
    low = pixels.amin(dim=(1, 2, 3), keepdim=True)
    high = pixels.amax(dim=(1, 2, 3), keepdim=True)
    scaled = (pixels - low) / (high - low).clamp(min=1e-5)
    return (scaled * 255 + 0.5).clamp(0, 255).floor() / 255


def concept_images(params: Params, cfg: FinetuneParams, name: str, inverted_dir: Path,
                   image_size: int | None) -> torch.Tensor:
    """A concept's inverted images (raw, or as the authors' min-max PNGs), or (images: noise) as
    many seeded uniform-noise images."""
    if cfg.images == "inverted":
        pixels = load_inversion(Path(inverted_dir) / name)
        return minmax_png(pixels) if cfg.pixels == "minmax_png" else pixels
    if image_size is None:
        raise ValueError("noise images need the model's input size (training_set image_size)")
    return noise_images(params.invert.samples, image_size, concept_seed(params.seed, f"noise/{name}"))


def training_set(params: Params, cfg: FinetuneParams, concepts_dir: Path, inverted_dir: Path,
                 image_size: int | None = None) -> TrainingSet:
    """Images, labels and captions of a recipe's fine-tuning (`cfg`, from `params.recipe`);
    `image_size` sizes noise images."""
    chosen = choose_concepts(read_concepts(concepts_dir, params.concepts.names), cfg)
    images = [concept_images(params, cfg, c.name, inverted_dir, image_size) for c in chosen]
    labels = torch.cat([torch.full((len(x),), k) for k, x in enumerate(images)])
    captions = [finetune_caption(c, cfg.name_prefix) for c in chosen]
    return TrainingSet(torch.cat(images), labels, captions, [c.name for c in chosen])


def run_finetune(params: Params, recipe: str, concepts_dir: Path, inverted_dir: Path,
                 out_dir: Path, log_path: Path) -> dict:
    """Fine-tune the base model with a recipe; write the checkpoint folder and a training log."""
    cfg = params.recipe(recipe)
    model = load_base_model(params.model)
    data = training_set(params, cfg, concepts_dir, inverted_dir, model.image_size)
    lr = params.recipe_lr(recipe)
    start = time.time()
    log = finetune(model, data.pixels, data.labels, data.captions, cfg, lr, params.seed, recipe=recipe)
    with atomic_dir(out_dir) as tmp:
        model.save(tmp)
    summary = {"recipe": recipe, "lr": lr, "base_lr": params.lr, "lr_multiplier": cfg.lr_multiplier,
               "images": cfg.images, "loss": cfg.loss, "concepts": data.concepts, "config": dataclasses.asdict(cfg),
               "captions": data.captions, "n_images": int(data.pixels.shape[0]),
               "seconds": round(time.time() - start, 2), "log": log}
    write_json(log_path, summary)
    return summary
