"""WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): the fine-tuned model's
weights moved back toward the base model's, theta(alpha) = base + alpha (fine-tuned - base), after
fine-tuning and without retraining. alpha 1 is the fine-tuned model, alpha 0 the base model, and in
between retention usually comes back faster than the novel concepts are forgotten
(`evaluate.wise_alphas` evaluates every recipe at each alpha).
"""
from __future__ import annotations

from typing import Any

import torch


def interpolate(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """State dict at `alpha` between `base` (0) and `tuned` (1), exact at both ends (torch.lerp
    computes tuned - (tuned - base)(1 - alpha) above one half). Tensors that are not floating point
    (position ids, step counters) are the tuned model's."""
    if base.keys() != tuned.keys():
        raise ValueError(f"WiSE-FT needs two models of one architecture; keys differ: "
                         f"{sorted(base.keys() ^ tuned.keys())[:5]}")
    return {key: torch.lerp(base[key].to(value), value, alpha) if value.is_floating_point() else value
            for key, value in tuned.items()}


def load_wise(model: Any, base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> Any:
    """Put the weights at `alpha` between `base` and `tuned` (state dicts) into `model` (a ktpipe model
    wrapper of the same architecture), in place: one model serves every alpha, compiled once."""
    model.module.load_state_dict(interpolate(base, tuned, alpha))
    return model
