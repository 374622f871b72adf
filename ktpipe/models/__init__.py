"""Model backends, picked from a registry by the `model.backend` param."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ktpipe.errors import InputMissingError
from ktpipe.models.base import (CROSS_ENCODER, DUAL_ENCODER, EmbedsImages, EmbedsTexts, ImageTextModel, Invertible,
                                ScoresPairs, Trainable)
from ktpipe.models.demo import build_demo_model, load_demo_model, load_demo_text_budget
from ktpipe.models.openclip import LOCAL_DIR, ModelLoadError, OpenClipModel, TextBudget, load_text_budget

if TYPE_CHECKING:
    from ktpipe.params import ModelParams

# backend name -> loader(name, pretrained, device)
BACKENDS: dict[str, Callable[[str, str | None, str], ImageTextModel]] = {
    "open_clip": OpenClipModel.load,
    "demo": load_demo_model,
}
# backend name -> text budget loader(name, pretrained): the tokenizer alone, for length checks
TEXT_BUDGETS: dict[str, Callable[[str, str | None], TextBudget]] = {
    "open_clip": load_text_budget,
    "demo": load_demo_text_budget,
}


def pick_device(device: str = "auto") -> str:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(backend: str, name: str, pretrained: str | None = None, device: str = "auto") -> ImageTextModel:
    """Load a model through its backend, with a clear error for unknown backends."""
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown model backend {backend!r}; known backends: {sorted(BACKENDS)}")
    return BACKENDS[backend](name, pretrained, pick_device(device))


def load_base_text_budget(params: "ModelParams") -> TextBudget:
    """The base model's text budget (context length, token counts), without loading weights."""
    if params.backend not in TEXT_BUDGETS:
        raise ModelLoadError(f"unknown model backend {params.backend!r}; known backends: {sorted(TEXT_BUDGETS)}")
    return TEXT_BUDGETS[params.backend](params.name, params.pretrained)


def load_base_model(params: "ModelParams") -> ImageTextModel:
    """The model before transfer, as the `model` params section describes it."""
    return load_model(params.backend, params.name, params.pretrained, params.device)


def load_checkpoint(params: "ModelParams", folder: Path) -> ImageTextModel:
    """A fine-tuned checkpoint folder, through the same backend as the base model."""
    if not Path(folder).is_dir():
        raise InputMissingError(f"checkpoint folder not found: {folder}")
    return load_model(params.backend, f"{LOCAL_DIR}{folder}", None, params.device)


__all__ = [
    "BACKENDS", "CROSS_ENCODER", "DUAL_ENCODER", "EmbedsImages", "EmbedsTexts", "ImageTextModel", "Invertible",
    "ModelLoadError", "ScoresPairs", "Trainable",
    "OpenClipModel", "TextBudget", "build_demo_model", "load_base_model", "load_base_text_budget", "load_checkpoint", "load_model", "pick_device",
]
