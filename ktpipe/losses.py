"""Contrastive objectives of pretraining and fine-tuning.

Fine-tuning objectives share one signature, `(image_emb, text_emb, targets, temperature)`, and
are picked by name from `FINETUNE_LOSSES` (params `finetune.loss`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

AUTHORS_BASE_TEMPERATURE = 0.07  # the authors' loss is scaled by temperature / 0.07 (1 at their default)


def info_nce(
    image_emb: torch.Tensor, text_emb: torch.Tensor, targets: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Paper Eq. 2: each image against its own caption, all other captions as negatives.

    image_emb (B, D) and text_emb (K, D) are L2-normalized; targets (B,) index rows of
    text_emb. With K == B and targets == arange(B) this is CLIP's image->text loss.
    """
    logits = logit_scale * image_emb @ text_emb.T  # (B, K)
    return F.cross_entropy(logits, targets)


def eq2_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, targets: torch.Tensor,
             temperature: torch.Tensor | float) -> torch.Tensor:
    """Eq. 2 over the recipe's K captions; with one caption the logits are (B, 1) and the loss is
    identically 0, so `finetune` refuses a one-caption recipe with this loss before training."""
    return info_nce(image_emb, text_emb, targets, 1.0 / temperature)


def authors_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, targets: torch.Tensor,
                 temperature: torch.Tensor | float) -> torch.Tensor:
    """The InfoNCE of the authors' public fine-tuning code (`infonce` in
    MedCLIP-SAMv2 transfer/biomedclip_finetune.py), written from its definition.

    The 2B anchors are the batch's images (B, D) and each image's own caption embedding
    (text_emb[targets], repeated for images of one concept). Anchor i's positive is its pair
    (image i <-> caption row i); every other anchor but itself is in the denominator, so
    images also repel each other and a single concept still gets a gradient. The mean of
    -log p(positive) is scaled by temperature / 0.07.
    """
    features = torch.cat([image_emb, text_emb[targets]])  # (2B, D)
    b = image_emb.shape[0]
    logits = features @ features.T / temperature  # (2B, 2B)
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    partner = torch.arange(2 * b, device=logits.device).roll(b)  # i <-> i + B
    return (temperature / AUTHORS_BASE_TEMPERATURE) * F.cross_entropy(logits, partner)


FINETUNE_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"eq2": eq2_loss, "authors": authors_loss}


def distillation_loss(image_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """MSE between the fine-tuned and the frozen base model's normalized image embeddings (B, D),
    as the authors' `kd_weight` term."""
    return F.mse_loss(image_emb, teacher_emb)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric in-batch contrastive loss over aligned (B, D) pairs (CLIP pretraining)."""
    targets = torch.arange(image_emb.shape[0], device=image_emb.device)
    logits = logit_scale * image_emb @ text_emb.T  # (B, B)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
