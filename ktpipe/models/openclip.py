"""open_clip backend: CLIP, CoCa and BiomedCLIP-style models behind `ImageTextModel`.

Checkpoints are written as an open_clip 'local-dir' folder (`open_clip_config.json` plus
`open_clip_model.safetensors`), so plain open_clip loads them again with
`open_clip.create_model_and_transforms("local-dir:<folder>")`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import v2 as T

from ktpipe.models.base import DUAL_ENCODER

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"


class ModelLoadError(ValueError):
    """A model name, pretrained tag or checkpoint cannot be resolved."""


def resolve_model_config(name: str) -> dict[str, Any]:
    """The open_clip architecture config for a model name, or a clear error."""
    if name.startswith(LOCAL_DIR):
        config_path = Path(name[len(LOCAL_DIR):]) / CONFIG_FILE
        if not config_path.is_file():
            raise ModelLoadError(f"checkpoint folder has no {CONFIG_FILE}: {config_path.parent}")
        return json.loads(config_path.read_text())["model_cfg"]
    if name.startswith(HF_HUB):
        from huggingface_hub import hf_hub_download  # only reached at sites with hub access

        path = hf_hub_download(name[len(HF_HUB):], CONFIG_FILE)
        return json.loads(Path(path).read_text())["model_cfg"]
    config = open_clip.get_model_config(name.replace("/", "-"))
    if config is None:
        close = [m for m in open_clip.list_models() if name.lower()[:5] in m.lower()][:8]
        raise ModelLoadError(f"unknown open_clip model name {name!r}; similar known names: {close}")
    return config


def check_pretrained(name: str, pretrained: str | None) -> None:
    """Fail early, before any download, on a pretrained value that cannot work."""
    if pretrained is None or name.startswith((LOCAL_DIR, HF_HUB)):
        return
    tags = open_clip.list_pretrained_tags_by_model(name.replace("/", "-"))
    if pretrained in tags:
        return
    if Path(pretrained).is_dir():
        raise ModelLoadError(f"pretrained {pretrained!r} is a folder; use model name 'local-dir:{pretrained}'")
    if not Path(pretrained).is_file():
        raise ModelLoadError(
            f"pretrained {pretrained!r} for {name!r} is neither a known tag {tags} nor an existing checkpoint file"
        )


BLOCK_RE = re.compile(r"\.(?:resblocks|blocks)\.(\d+)\.")
STEM_KEYS = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_embed", "cls_token",
             "pos_embed", "norm_pre")


def visual_top(names: list[str], last_blocks: int | None) -> list[str]:
    """Visual parameter names to train: all of them, or the last `last_blocks` transformer
    blocks plus everything after them (final norm, projection); the stem stays frozen."""
    visual = [n for n in names if n.startswith("visual.")]
    if last_blocks is None:
        return visual
    blocks = {int(m.group(1)) for n in visual if (m := BLOCK_RE.search(n))}
    if not blocks:
        raise ValueError("visual_layers is set but the visual tower has no numbered transformer blocks")
    first = max(blocks) + 1 - last_blocks

    def keep(name: str) -> bool:
        match = BLOCK_RE.search(name)
        if match:
            return int(match.group(1)) >= first
        return not any(key in name for key in STEM_KEYS)

    return [n for n in visual if keep(n)]


class OpenClipModel:
    """An open_clip model (CLIP, CustomTextCLIP or CoCa) behind the ktpipe interface."""

    kind = DUAL_ENCODER

    def __init__(self, module: torch.nn.Module, tokenizer: Any, model_cfg: dict[str, Any], device: str = "cpu"):
        self.module = module.to(device)
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.device = device
        pp = open_clip.get_model_preprocess_cfg(module)
        size = pp.get("size", 224)
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.mean = torch.tensor(pp["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pp["std"], device=device).view(1, 3, 1, 1)
        self.can_caption = isinstance(module, open_clip.CoCa)
        self._to_pixels = T.Compose([
            T.ToImage(),
            T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(self.image_size),
            T.ToDtype(torch.float32, scale=True),
        ])

    @classmethod
    def load(cls, name: str, pretrained: str | None = None, device: str = "cpu") -> "OpenClipModel":
        """Build from an open_clip name plus tag/file, a 'local-dir:' folder or an 'hf-hub:' id."""
        model_cfg = resolve_model_config(name)
        check_pretrained(name, pretrained)
        module = open_clip.create_model(name, pretrained=pretrained, device=device)
        return cls(module, open_clip.get_tokenizer(name), model_cfg, device)

    @classmethod
    def from_config(cls, model_cfg: dict[str, Any], device: str = "cpu") -> "OpenClipModel":
        """A random-init model from an architecture config dict (tests, demo pretraining)."""
        module = open_clip.CoCa(**model_cfg) if "multimodal_cfg" in model_cfg else open_clip.CLIP(**model_cfg)
        context = model_cfg["text_cfg"].get("context_length", 77)
        open_clip.set_model_preprocess_cfg(module, {
            "size": model_cfg["vision_cfg"]["image_size"],
            "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD,
            "interpolation": "bicubic", "resize_mode": "shortest",
        })
        return cls(module, open_clip.SimpleTokenizer(context_length=context), model_cfg, device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._to_pixels(image.convert("RGB"))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.module.encode_image(self.normalize(pixels.to(self.device))), dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.module.encode_text(self.tokenize(texts)), dim=-1)

    def score_pairs(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return (self.encode_images(pixels) * self.encode_texts(texts)).sum(-1)

    def logit_scale(self) -> torch.Tensor:
        return self.module.logit_scale.exp()

    def tower_parameters(self, tower: str, last_blocks: int | None = None) -> Iterable[torch.nn.Parameter]:
        if tower not in ("visual", "text", "both"):
            raise ValueError(f"tower must be visual, text or both, got {tower!r}")
        names = [n for n, _ in self.module.named_parameters()]
        keep_visual = set(visual_top(names, last_blocks))
        for name, param in self.module.named_parameters():
            if name.startswith(("logit_scale", "logit_bias", "text_decoder.")):
                continue
            if name.startswith("visual."):
                if tower in ("visual", "both") and name in keep_visual:
                    yield param
            elif tower in ("text", "both"):
                yield param

    def save(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = {"model_cfg": self.model_cfg, "preprocess_cfg": open_clip.get_model_preprocess_cfg(self.module)}
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=list))
        state = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}
        save_file(state, str(out_dir / WEIGHTS_FILE))
