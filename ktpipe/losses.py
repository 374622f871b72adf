"""Contrastive objectives."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    image_emb: torch.Tensor, text_emb: torch.Tensor, targets: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Paper Eq. 2: each image against its own caption, all other captions as negatives.

    image_emb (B, D) and text_emb (K, D) are L2-normalized; targets (B,) index rows of
    text_emb. With K == B and targets == arange(B) this is CLIP's image->text loss.
    """
    logits = logit_scale * image_emb @ text_emb.T  # (B, K)
    return F.cross_entropy(logits, targets)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric in-batch contrastive loss over aligned (B, D) pairs (CLIP pretraining)."""
    targets = torch.arange(image_emb.shape[0], device=image_emb.device)
    logits = logit_scale * image_emb @ text_emb.T  # (B, B)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
