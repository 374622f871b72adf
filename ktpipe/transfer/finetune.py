"""Fine-tuning on (inverted image, "A <name> is <description>.") pairs with a contrastive objective.

The model is reached through its capabilities only (ktpipe.models.base): the objective asks it for
scores or embeddings (ktpipe.transfer.losses), `Trainable` names what trains and saves the checkpoint.
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

from ktpipe import distributed
from ktpipe.concepts import ConceptsError, ConceptText, concept_seed, finetune_caption, read_concepts
from ktpipe.errors import KtpipeError, check_finite
from ktpipe.images import initial_pixels, load_inversion
from ktpipe.io import atomic_dir, write_json
from ktpipe.precision import autocast, grad_scaler
from ktpipe.transfer.lora import add_lora, merge_lora
from ktpipe.transfer.losses import FINETUNE_LOSSES, distillation_loss
from ktpipe.models import EmbedsImages, EmbedsTexts, LearnsCaptions, Trainable, load_base_model, require
from ktpipe.params import FinetuneParams, Params, ParamsError


def set_trainable(model: Trainable, towers: str, visual_layers: int | None = None,
                  decoder: bool = False) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze the chosen towers (and a captioner's text decoder);
    returns the trainable parameters."""
    for p in model.module.parameters():
        p.requires_grad_(False)
    params = list(model.tower_parameters(towers, visual_layers))
    if decoder:
        params += list(model.decoder_parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def build_optimizer(params: list[torch.nn.Parameter], cfg: FinetuneParams, lr: float) -> torch.optim.Optimizer:
    """Adam with L2 decay or AdamW with decoupled decay (CLIP's choice), with the recipe's betas and eps."""
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(params, lr=lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps)


def check_objective(cfg: FinetuneParams, captions: list[str], negatives: list[str], recipe: str) -> None:
    """Refuse objectives that would learn nothing: Eq. 2 contrasts an image only against the
    recipe's captions, so with one distinct caption its logits are (B, 1) and its loss is 0;
    image-text matching needs a caption to call a mismatch."""
    if cfg.loss == "eq2" and len(set(captions)) < 2:
        raise ParamsError(
            f"recipe {recipe!r}: finetune.loss 'eq2' needs at least two distinct captions, the recipe has "
            f"{len(set(captions))} ({captions[:1]}); its loss and gradient would be 0 at every step. "
            "Use loss 'authors' (contrasts the batch's images and captions), or learn more concepts together")
    if cfg.loss == "itm" and len(set(captions) | set(negatives)) < 2:
        raise ParamsError(
            f"recipe {recipe!r}: finetune.loss 'itm' pushes an image's own caption to match and other captions to "
            f"no match, but the recipe and the experiment have one caption only ({captions[:1]}); add concepts to "
            "params 'concepts.names' (their captions become the negatives)")


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
    objective = FINETUNE_LOSSES[cfg.loss]
    for capability in objective.needs:
        require(model, capability, f"recipe {recipe!r}: finetune.loss {cfg.loss!r}")
    require(model, Trainable, f"recipe {recipe!r}: fine-tuning")
    if cfg.decoder:
        require(model, LearnsCaptions, f"recipe {recipe!r}: finetune.decoder (training a text decoder)")
    if cfg.kd_weight > 0:
        require(model, EmbedsImages, f"recipe {recipe!r}: distillation (finetune.kd_weight)")
    if cfg.temperature is None and objective.uses_temperature:
        require(model, EmbedsTexts, f"recipe {recipe!r}: finetune.temperature null (the model's own)")


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter],
                  recipe: str, step: int, scaler: torch.amp.GradScaler | None = None) -> None:
    """Backpropagate and step, stopping on a non-finite loss or gradient before the weights change
    (with an active fp16 `scaler`, a non-finite gradient skips the step and lowers the loss scale)."""
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    check_finite(loss, "loss", f"fine-tuning recipe {recipe!r}", step)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grads = [p.grad.norm() for p in trainable if p.grad is not None]
    if grads and not scaler.is_enabled():
        check_finite(torch.stack(grads).sum(), "gradient norm", f"fine-tuning recipe {recipe!r}", step)
    scaler.step(optimizer)
    scaler.update()


def temperature_of(model: Any, cfg: FinetuneParams) -> Any:
    """The objective's temperature: the recipe's, else the model's own (1 / logit scale); None for
    objectives without one."""
    if not FINETUNE_LOSSES[cfg.loss].uses_temperature:
        return None
    return cfg.temperature if cfg.temperature is not None else 1.0 / model.logit_scale().detach()


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
    negatives: list[str] | None = None,
    names: list[str] | None = None,
) -> list[dict]:
    """Train `cfg.towers` for `cfg.epochs` on pixels (N, 3, S, S) whose labels (N,) index captions.

    The objective is `cfg.loss` (losses.FINETUNE_LOSSES), at `cfg.temperature` (None: the model's
    own) where it has one, plus `cfg.kd_weight` times the distillation MSE to the frozen model, plus
    `cfg.l2sp_weight` times the L2-SP penalty toward the starting weights (`l2sp_penalty`); with
    `cfg.lora_rank` only low-rank adapters train, merged into the weights at the end. An
    objective that scores mismatches (image-text matching) also scores every image against
    `negatives`, captions no image has; `names` are the captions' concept names as written in text
    (a captioner's target captions name them). Returns the per-step log.
    """
    if pixels.shape[0] == 0:
        raise KtpipeError(f"recipe {recipe!r}: no images to fine-tune on")
    spec = FINETUNE_LOSSES[cfg.loss]
    world = distributed.world_size()
    if world > 1 and cfg.loss not in SHARDS:
        raise ParamsError(f"recipe {recipe!r}: finetune.loss {cfg.loss!r} cannot be shared out over processes (it "
                          "draws each batch's random choices for the whole batch, or averages over its tokens); set "
                          "params 'distributed.nproc_per_node' to 1")
    negatives = [n for n in (negatives or []) if n not in captions] if spec.negatives else []
    check_objective(cfg, captions, negatives, recipe)
    check_capabilities(model, cfg, recipe)
    texts = [*captions, *negatives]
    teacher = frozen_copy(model) if cfg.kd_weight > 0 else None
    trainable = set_trainable(model, cfg.towers, cfg.visual_layers, cfg.decoder)
    if cfg.lora_rank:
        trainable = add_lora(model, trainable, cfg, recipe)
    start = [p.detach().clone() for p in trainable] if cfg.l2sp_weight > 0 else None  # L2-SP's anchor
    optimizer = build_optimizer(trainable, cfg, lr)
    generator = torch.Generator().manual_seed(seed)
    text_trains = cfg.towers in ("text", "both") and spec.targets is None
    run_targets = (spec.targets(model, texts, seed, names=names, cfg=cfg) if spec.targets
                   else frozen_text_targets(model, texts, text_trains))
    temperature = temperature_of(model, cfg)
    device = next(model.module.parameters()).device
    scaler = grad_scaler(cfg.precision, device)

    def batch_loss(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's loss (over several processes: this rank's term, whose gradient averaged over
        the ranks by DDP is the batch's) and the values the log records."""
        local, weight = rank_share(batch)
        with autocast(cfg.precision, device):
            targets = model.text_targets(texts) if text_trains else run_targets
            if world > 1 and SHARDS[cfg.loss] == "gather":
                keep = len(local) if weight else 0
                loss = spec.loss(GatheredImages(model, keep), pixels[local], targets, labels[batch], temperature).float()
            else:
                loss = weight * spec.loss(model, pixels[local], targets, labels[local], temperature).float()
            shown = {"loss": round(distributed.mean_across(loss).item(), 6)}
            if teacher is not None:
                with torch.no_grad():
                    teacher_emb = teacher.encode_images(pixels[local])
                kd = weight * distillation_loss(model.encode_images(pixels[local]).float(), teacher_emb.float())
                loss = loss + cfg.kd_weight * kd
                shown["kd_loss"] = round(distributed.mean_across(kd).item(), 8)
        if start is not None:  # the same on every rank: DDP's average of its gradient is itself
            penalty = l2sp_penalty(trainable, start)
            loss = loss + cfg.l2sp_weight * penalty
            shown["l2sp"] = round(penalty.item(), 10)
        return loss, shown

    step_loss = StepLoss(model, batch_loss)
    run = distributed.data_parallel(step_loss) if world > 1 else step_loss
    model.module.train()
    log, step = [], 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(pixels.shape[0], generator=generator)
        batches = order.split(cfg.batch_size)
        for batch in tqdm(batches, desc=f"finetune {recipe} epoch {epoch + 1}/{cfg.epochs}",
                          disable=not progress or not distributed.is_main(), leave=False):
            loss, shown = run(batch)
            backward_step(loss, optimizer, trainable, recipe, step, scaler)
            log.append({"step": step, "epoch": epoch, **shown})
            step += 1
    if cfg.lora_rank:
        merge_lora(model)
    model.module.eval()
    return log


# How fine-tuning over several processes (DDP) shares out a batch, per objective (losses.FINETUNE_LOSSES):
# "images", a mean over the batch's images (each rank's share weighted by its size); "gather", it contrasts the
# batch's images with each other (every rank gathers the batch's image embeddings: GatheredImages). Masked words
# (mlm) average over tokens and draw each batch's masks for the whole batch, CoCa its target captions: not shared.
SHARDS = {"eq2": "images", "itm": "images", "authors": "gather"}


def l2sp_penalty(weights: list[torch.nn.Parameter], start: list[torch.Tensor]) -> torch.Tensor:
    """L2-SP (Li et al. 2018, "Explicit inductive bias for transfer learning"): half the squared L2
    distance of the trained weights to where they started, the base model's."""
    return 0.5 * sum(((w.float() - s.float()) ** 2).sum() for w, s in zip(weights, start))


class StepLoss(torch.nn.Module):
    """A step's loss as a module's forward: DistributedDataParallel syncs the gradients of what its
    wrapped module's forward ran, so fine-tuning over several processes runs each step through it."""

    def __init__(self, model: Any, compute):
        super().__init__()
        self.net, self.compute = model.module, compute

    def forward(self, batch: torch.Tensor):
        return self.compute(batch)


def rank_share(batch: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This process's images of a batch (all of them in one process) and the weight of its per-image
    loss terms: its share's size over the mean share's, so that the ranks' gradients, averaged by DDP,
    are the whole batch's. A rank left without an image (a batch smaller than the ranks) runs one at
    weight 0, so that it still takes part in every collective."""
    local = batch[distributed.shard(len(batch))]
    if len(local) == 0:
        return batch[:1], 0.0
    return local, len(local) * distributed.world_size() / len(batch)


class GatheredImages:
    """The model, except that `encode_images` of this rank's images returns the embeddings of the
    whole batch, every rank's share in rank order (an all-gather whose backward sums the gradients
    that every rank's copy of the loss sends to this rank's embeddings): for an objective that contrasts
    the batch's images with each other, every rank computes the batch's loss. DDP then averages, so
    each weight's gradient is the whole batch's. `keep` rows of this rank's embeddings count (0 for a
    rank without an image of its own)."""

    def __init__(self, model: Any, keep: int):
        self._model, self._keep = model, keep

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def encode_images(self, pixels: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return distributed.all_gather_rows(self._model.encode_images(pixels, *args, **kwargs)[:self._keep])


@dataclass(frozen=True)
class TrainingSet:
    pixels: torch.Tensor  # (N, 3, S, S) in [0, 1]
    labels: torch.Tensor  # (N,) index into captions
    captions: list[str]  # (K,) one fine-tuning caption per concept
    concepts: list[str]  # (K,) concept names, in caption order
    negatives: list[str]  # captions of the experiment's other concepts (image-text matching's mismatches)
    names: list[str]  # (K,) concept names as written in text, in caption order (a captioner's target captions)


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


def noise_images(n: int, size: int, seed: int, init: str = "uniform") -> torch.Tensor:
    """(n, 3, size, size) random pixels drawn as inversion starts (`invert.init`): the ablation's
    stand-in for inversions, and implicit transfer's images (paper Sec. 8.9)."""
    return initial_pixels(n, size, torch.Generator().manual_seed(seed), init)


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
    return noise_images(params.invert.samples, image_size, concept_seed(params.seed, f"noise/{name}"),
                        params.invert.init)


def training_set(params: Params, cfg: FinetuneParams, concepts_dir: Path, inverted_dir: Path,
                 image_size: int | None = None) -> TrainingSet:
    """Images, labels and captions of a recipe's fine-tuning (`cfg`, from `params.recipe`);
    `image_size` sizes noise images."""
    every = read_concepts(concepts_dir, params.concepts.names)
    chosen = choose_concepts(every, cfg)
    images = [concept_images(params, cfg, c.name, inverted_dir, image_size) for c in chosen]
    labels = torch.cat([torch.full((len(x),), k) for k, x in enumerate(images)])
    captions = [finetune_caption(c, cfg.name_prefix) for c in chosen]
    negatives = [finetune_caption(c, cfg.name_prefix) for c in every if c not in chosen]
    if cfg.swapped_names:  # each learned description under every other concept's name
        negatives += [finetune_caption(dataclasses.replace(c, name=other.name, label=other.label), cfg.name_prefix)
                      for c in chosen for other in every if other.name != c.name]
    return TrainingSet(torch.cat(images), labels, captions, [c.name for c in chosen], negatives,
                       [c.text_name for c in chosen])


def run_finetune(params: Params, recipe: str, concepts_dir: Path, inverted_dir: Path,
                 out_dir: Path, log_path: Path) -> dict:
    """Fine-tune the base model with a recipe; write the checkpoint folder and a training log."""
    cfg = params.recipe(recipe)
    model = load_base_model(params.model)
    check_capabilities(model, cfg, recipe)  # before reading any image
    data = training_set(params, cfg, concepts_dir, inverted_dir, model.image_size)
    lr = params.recipe_lr(recipe)
    start = time.time()
    log = finetune(model, data.pixels, data.labels, data.captions, cfg, lr, params.seed, recipe=recipe,
                   negatives=data.negatives, names=data.names)
    with atomic_dir(out_dir) as tmp:
        model.save(tmp)
    summary = {"recipe": recipe, "lr": lr, "base_lr": params.lr, "lr_multiplier": cfg.lr_multiplier,
               "images": cfg.images, "loss": cfg.loss, "concepts": data.concepts, "config": dataclasses.asdict(cfg),
               "captions": data.captions, "negatives": data.negatives if FINETUNE_LOSSES[cfg.loss].negatives else [],
               "n_images": int(data.pixels.shape[0]),
               "seconds": round(time.time() - start, 2), "log": log}
    write_json(log_path, summary)
    return summary
