"""Fine-tuning objectives, picked by name from `FINETUNE_LOSSES` (params `finetune.loss`).

An objective asks the model for scores or embeddings through its capabilities (ktpipe.models.base)
and names the capabilities it needs, so fine-tuning takes any model family that has them: Eq. 2
needs only match scores (a cross-encoder's too); the authors' InfoNCE and distillation need image
embeddings. The loss arithmetic is in small pure functions, unit-tested on tiny tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ktpipe.models.base import EmbedsImages, ScoresPairs

AUTHORS_BASE_TEMPERATURE = 0.07  # the authors' loss is scaled by temperature / 0.07 (1 at their default)


def eq2_loss(scores: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """Paper Eq. 2: each image against its own caption, the recipe's other captions as negatives.

    scores (B, K) are the images' cosine similarities (or match scores) to the K captions; targets
    (B,) index the caption of each image. With one caption the logits are (B, 1) and the loss is
    identically 0, so `finetune` refuses a one-caption recipe with this loss before training.
    """
    return F.cross_entropy(scores / temperature, targets)


def authors_infonce(image_emb: torch.Tensor, caption_emb: torch.Tensor,
                    temperature: torch.Tensor | float) -> torch.Tensor:
    """The InfoNCE of the authors' public fine-tuning code (`infonce` in
    MedCLIP-SAMv2 transfer/biomedclip_finetune.py), written from its definition.

    The 2B anchors are the batch's images (B, D) and each image's own caption embedding (B, D),
    repeated for images of one concept. Anchor i's positive is its pair (image i <-> caption row i);
    every other anchor but itself is in the denominator, so images also repel each other and a
    single concept still gets a gradient. The mean of -log p(positive) is scaled by temperature / 0.07.
    """
    features = torch.cat([image_emb, caption_emb])  # (2B, D)
    b = image_emb.shape[0]
    logits = features @ features.T / temperature  # (2B, 2B)
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    partner = torch.arange(2 * b, device=logits.device).roll(b)  # i <-> i + B
    return (temperature / AUTHORS_BASE_TEMPERATURE) * F.cross_entropy(logits, partner)


def distillation_loss(image_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """MSE between the fine-tuned and the frozen base model's normalized image embeddings (B, D),
    as the authors' `kd_weight` term."""
    return F.mse_loss(image_emb, teacher_emb)


@dataclass(frozen=True)
class Objective:
    """A fine-tuning loss: `loss(model, pixels, text_targets, labels, temperature)` and the model
    capabilities it uses. `text_targets` come from `model.text_targets(captions)`; labels (B,)
    index them."""

    loss: Callable[[Any, torch.Tensor, Any, torch.Tensor, Any], torch.Tensor]
    needs: tuple[type, ...]


def eq2_objective(model: ScoresPairs, pixels: torch.Tensor, text_targets: Any, labels: torch.Tensor,
                  temperature: torch.Tensor | float) -> torch.Tensor:
    """Eq. 2 on the model's (B, K) scores of the batch against every caption of the recipe."""
    scores = model.score_targets(pixels, text_targets)
    return eq2_loss(scores, labels.to(scores.device), temperature)


def authors_objective(model: EmbedsImages, pixels: torch.Tensor, text_targets: torch.Tensor, labels: torch.Tensor,
                      temperature: torch.Tensor | float) -> torch.Tensor:
    """The authors' InfoNCE on the batch's image embeddings and their captions' embeddings."""
    image_emb = model.encode_images(pixels)
    return authors_infonce(image_emb, text_targets[labels.to(image_emb.device)], temperature)


FINETUNE_LOSSES: dict[str, Objective] = {
    "eq2": Objective(eq2_objective, (ScoresPairs,)),
    "authors": Objective(authors_objective, (ScoresPairs, EmbedsImages)),
}
