"""The demo backend: a tiny open_clip CLIP pretrained from scratch on the demo world."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ktpipe.models.base import ModelLoadError
from ktpipe.models.openclip import CONFIG_FILE, LOCAL_DIR, OpenClipModel, TextBudget, build_tokenizer

DEMO_ARCH = "ktpipe-demo"


def demo_config() -> dict:
    """The demo architecture (ViT patch 8, width 96, 3 layers; text width 64, 2 layers)."""
    text = (resources.files("ktpipe.models") / "configs" / f"{DEMO_ARCH}.json").read_text()
    return json.loads(text)


def build_demo_model(device: str = "cpu") -> OpenClipModel:
    """A random-init demo model, the starting point of demo pretraining."""
    return OpenClipModel.from_config(demo_config(), device)


def load_demo_text_budget(name: str, pretrained: str | None = None) -> TextBudget:
    """The demo text tower's budget (context 24), from the packaged architecture config."""
    return TextBudget(build_tokenizer(demo_config()))


def load_demo_model(name: str, pretrained: str | None, device: str = "cpu") -> OpenClipModel:
    """Load the pretrained demo model from the checkpoint folder the pretrain stage wrote."""
    if name.startswith(LOCAL_DIR):  # a fine-tuned demo checkpoint
        folder = Path(name[len(LOCAL_DIR):])
    elif name == DEMO_ARCH and pretrained:
        folder = Path(pretrained)
    else:
        raise ModelLoadError(
            f"demo backend takes name {DEMO_ARCH!r} with pretrained=<checkpoint folder>, "
            f"or 'local-dir:<folder>'; got name={name!r}, pretrained={pretrained!r}"
        )
    if not (folder / CONFIG_FILE).is_file():
        raise ModelLoadError(
            f"demo checkpoint not found at {folder} (no {CONFIG_FILE}); run `dvc repro pretrain` first"
        )
    return OpenClipModel.load(f"{LOCAL_DIR}{folder}", device=device)
