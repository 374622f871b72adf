"""Pure metric functions on tensors of predictions and labels."""
from __future__ import annotations

import torch


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy of (N,) predicted labels against (N,) true labels."""
    if target.numel() == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return (pred == target).float().mean().item()


def per_class_accuracy(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> list[float | None]:
    """Top-1 accuracy per true class; None for classes without samples."""
    out: list[float | None] = []
    for k in range(n_classes):
        mask = target == k
        out.append(accuracy(pred[mask], target[mask]) if mask.any() else None)
    return out
