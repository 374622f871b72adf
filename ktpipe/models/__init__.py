"""Model backends, picked from a registry by the `model.backend` param.

A backend module is imported only when its model is loaded (open_clip alone takes seconds to
import), so code that needs only the capability interfaces (ktpipe.models.base) stays light.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ktpipe.errors import InputMissingError
from ktpipe.models.base import (CROSS_ENCODER, DUAL_ENCODER, EmbedsImages, EmbedsTexts, GeneratesCaptions, Invertible,
                                LearnsCaptions, ModelLoadError, PredictsMaskedWords, ScoresPairs, TakesImages, Trainable,
                                VisionFeatures, require)

if TYPE_CHECKING:
    from ktpipe.models.openclip import OpenClipModel, TextBudget
    from ktpipe.params import ModelParams

LOCAL_DIR = "local-dir:"  # a checkpoint folder as a model name (open_clip's convention)


def load_open_clip(name: str, pretrained: str | None, device: str):
    from ktpipe.models.openclip import OpenClipModel

    return OpenClipModel.load(name, pretrained, device)


def load_demo(name: str, pretrained: str | None, device: str):
    from ktpipe.demo.models import load_demo_model

    return load_demo_model(name, pretrained, device)


def load_demo_coca(name: str, pretrained: str | None, device: str):
    from ktpipe.demo.models import load_demo_coca as load

    return load(name, pretrained, device)


def load_vilt(name: str, pretrained: str | None, device: str):
    from ktpipe.models.vilt import ViltCrossEncoder

    return ViltCrossEncoder.load(name, pretrained, device)


def load_demo_vilt(name: str, pretrained: str | None, device: str):
    from ktpipe.demo.vilt import load_demo_vilt as load

    return load(name, pretrained, device)


def open_clip_text_budget(name: str, pretrained: str | None) -> TextBudget:
    from ktpipe.models.openclip import load_text_budget

    return load_text_budget(name, pretrained)


def demo_text_budget(name: str, pretrained: str | None) -> TextBudget:
    from ktpipe.demo.models import load_demo_text_budget

    return load_demo_text_budget(name, pretrained)


def demo_coca_text_budget(name: str, pretrained: str | None) -> TextBudget:
    from ktpipe.demo.models import load_demo_coca_text_budget

    return load_demo_coca_text_budget(name, pretrained)


def vilt_text_budget(name: str, pretrained: str | None) -> Any:
    from ktpipe.models.vilt import load_vilt_text_budget

    return load_vilt_text_budget(name, pretrained)


def demo_vilt_text_budget(name: str, pretrained: str | None) -> Any:
    from ktpipe.demo.vilt import load_demo_vilt_text_budget

    return load_demo_vilt_text_budget(name, pretrained)


# backend name -> loader(name, pretrained, device) of a model with the capabilities its family has
BACKENDS: dict[str, Callable[[str, str | None, str], Any]] = {"open_clip": load_open_clip, "demo": load_demo,
                                                              "vilt": load_vilt, "demo_vilt": load_demo_vilt,
                                                              "demo_coca": load_demo_coca}
# backend name -> text budget loader(name, pretrained): the tokenizer alone, for length checks
TEXT_BUDGETS: dict[str, Callable[[str, str | None], TextBudget]] = {
    "open_clip": open_clip_text_budget, "demo": demo_text_budget, "vilt": vilt_text_budget,
    "demo_vilt": demo_vilt_text_budget, "demo_coca": demo_coca_text_budget,
}
LAZY = {"OpenClipModel": "ktpipe.models.openclip", "TextBudget": "ktpipe.models.openclip",
        "build_demo_model": "ktpipe.demo.models"}


def __getattr__(name: str) -> Any:
    """Backend classes, imported on first use (PEP 562)."""
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pick_device(device: str = "auto") -> str:
    """'auto' -> cuda when available, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(backend: str, name: str, pretrained: str | None = None, device: str = "auto") -> Any:
    """Load a model through its backend, with a clear error for unknown backends."""
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown model backend {backend!r}; known backends: {sorted(BACKENDS)}")
    return BACKENDS[backend](name, pretrained, pick_device(device))


def load_base_text_budget(params: "ModelParams") -> TextBudget:
    """The base model's text budget (context length, token counts), without loading weights."""
    if params.backend not in TEXT_BUDGETS:
        raise ModelLoadError(f"unknown model backend {params.backend!r}; known backends: {sorted(TEXT_BUDGETS)}")
    return TEXT_BUDGETS[params.backend](params.name, params.pretrained)


def load_base_model(params: "ModelParams") -> Any:
    """The model before transfer, as the `model` params section describes it."""
    return load_model(params.backend, params.name, params.pretrained, params.device)


def load_checkpoint(params: "ModelParams", folder: Path) -> Any:
    """A fine-tuned checkpoint folder, through the same backend as the base model."""
    if not Path(folder).is_dir():
        raise InputMissingError(f"checkpoint folder not found: {folder}")
    return load_model(params.backend, f"{LOCAL_DIR}{folder}", None, params.device)


__all__ = [
    "BACKENDS", "CROSS_ENCODER", "DUAL_ENCODER", "EmbedsImages", "EmbedsTexts", "GeneratesCaptions", "Invertible",
    "LOCAL_DIR", "LearnsCaptions", "ModelLoadError", "OpenClipModel", "PredictsMaskedWords", "ScoresPairs", "TakesImages", "TextBudget", "Trainable",
    "VisionFeatures", "build_demo_model", "load_base_model", "load_base_text_budget", "load_checkpoint", "load_model",
    "pick_device", "require",
]
