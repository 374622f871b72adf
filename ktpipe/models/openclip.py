"""open_clip backend: CLIP, CoCa and BiomedCLIP-style models behind the capability interfaces
(ktpipe.models.base).

Checkpoints are written as an open_clip 'local-dir' folder (`open_clip_config.json` plus
`open_clip_model.safetensors`, and the tokenizer files for hf text towers). Plain open_clip
loads them with `open_clip.create_model_and_transforms("local-dir:<folder>")`; when the
architecture is built into open_clip, the config's "arch" entry names it, and
`create_model_and_transforms(arch, pretrained="<folder>/open_clip_model.safetensors")` works too.
"""
from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import HFTokenizer
from PIL import Image
from safetensors.torch import save_file

from ktpipe.models import LOCAL_DIR
from ktpipe.models.base import DUAL_ENCODER, SQUARE_RESIZE, ModelLoadError, square_pixels

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
HF_HUB = "hf-hub:"
TOKEN_CACHE_SIZE = 1 << 16  # distinct texts whose token ids a model keeps (pretraining repeats most captions)



def read_config_file(name: str) -> dict[str, Any]:
    """The whole `open_clip_config.json` of a 'local-dir:' folder or an 'hf-hub:' id."""
    if name.startswith(LOCAL_DIR):
        config_path = Path(name[len(LOCAL_DIR):]) / CONFIG_FILE
        if not config_path.is_file():
            raise ModelLoadError(f"checkpoint folder has no {CONFIG_FILE}: {config_path.parent}")
        return json.loads(config_path.read_text())
    from huggingface_hub import hf_hub_download  # only reached at sites with hub access

    return json.loads(Path(hf_hub_download(name[len(HF_HUB):], CONFIG_FILE)).read_text())


def resolve_model_config(name: str) -> dict[str, Any]:
    """The open_clip architecture config for a model name, or a clear error."""
    if name.startswith((LOCAL_DIR, HF_HUB)):
        return read_config_file(name)["model_cfg"]
    config = open_clip.get_model_config(name.replace("/", "-"))
    if config is None:
        close = [m for m in open_clip.list_models() if name.lower()[:5] in m.lower()][:8]
        raise ModelLoadError(f"unknown open_clip model name {name!r}; similar known names: {close}")
    return config


def builtin_arch(model_cfg: dict[str, Any], hint: str | None = None) -> str | None:
    """The built-in open_clip architecture name whose config is `model_cfg` (None if none is):
    the `name` that `create_model_and_transforms(name, pretrained=<file>)` needs."""
    candidates = [hint.replace("/", "-")] if hint else []
    for name in candidates + open_clip.list_models():
        if open_clip.get_model_config(name) == model_cfg:
            return name
    return None


def model_class(model_cfg: dict[str, Any]) -> type[torch.nn.Module]:
    """The class `open_clip.create_model` builds for a config: CoCa, CustomTextCLIP or CLIP."""
    if "multimodal_cfg" in model_cfg:
        return open_clip.CoCa
    if model_cfg.get("custom_text") or "hf_model_name" in model_cfg["text_cfg"]:
        return open_clip.CustomTextCLIP
    return open_clip.CLIP


def build_tokenizer(model_cfg: dict[str, Any]) -> Any:
    """The tokenizer `open_clip.get_tokenizer` picks for a config: HFTokenizer for hf text
    towers, SimpleTokenizer otherwise."""
    text_cfg = model_cfg["text_cfg"]
    context = text_cfg.get("context_length", 77)
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    if text_cfg.get("hf_tokenizer_name"):
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context,
                           tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs)
    return open_clip.SimpleTokenizer(context_length=context, **kwargs)


def random_init_module(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """A random-init network for a config; timm and hf towers are built without downloading
    weights (an hf text tower still reads its config from `hf_model_name`)."""
    cfg = copy.deepcopy(model_cfg)
    cls = model_class(cfg)
    cfg.pop("custom_text", None)
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    if "hf_model_name" in cfg["text_cfg"]:
        cfg["text_cfg"]["hf_model_pretrained"] = False
    module = cls(**cfg)
    if isinstance(module, open_clip.CoCa):  # open_clip leaves the decoder's output projection as torch.empty (its
        decoder = module.text_decoder  # init_parameters fails on a MultimodalTransformer): initialize it as meant
        with torch.no_grad():
            decoder.text_projection.normal_(std=decoder.width ** -0.5, generator=torch.Generator().manual_seed(0))
    return module


def state_for_saving(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; tied weights are copied, as safetensors refuses shared storage."""
    state, seen = {}, set()
    for key, value in module.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        state[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return state


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


def needs_quick_gelu(name: str, pretrained: str | None, model_cfg: dict[str, Any]) -> bool:
    """True when a pretrained tag was trained with QuickGELU but the named config lacks it."""
    if pretrained is None or name.startswith((LOCAL_DIR, HF_HUB)) or model_cfg.get("quick_gelu"):
        return False
    return bool(open_clip.get_pretrained_cfg(name.replace("/", "-"), pretrained).get("quick_gelu"))


def describe_source(name: str, pretrained: str | None, model_cfg: dict[str, Any]) -> tuple[str | None, str]:
    """(built-in architecture name or None, what the weights started from) for a loaded model;
    a ktpipe checkpoint folder passes on what its own config recorded."""
    base_model = name if pretrained is None else f"{name} pretrained={pretrained}"
    if name.startswith(LOCAL_DIR):
        saved = read_config_file(name)
        if "arch" in saved:
            return saved["arch"], saved.get("base_model") or base_model
    hint = None if name.startswith((LOCAL_DIR, HF_HUB)) else name
    return builtin_arch(model_cfg, hint), base_model


def wrapper_class(module: torch.nn.Module, cls: type) -> type:
    """The class a loaded network is served by: a CoCa gets the captioning capabilities
    (ktpipe.models.coca.OpenClipCaptioner), any other open_clip model `cls`."""
    if isinstance(module, open_clip.CoCa) and cls is OpenClipModel:
        from ktpipe.models.coca import OpenClipCaptioner

        return OpenClipCaptioner
    return cls


class TextBudget:
    """How many tokens a text tower reads (`context_length`, start and end tokens included), how
    many a text needs, and what the tokenizer keeps of a longer one (it cuts without a word)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.context_length = int(tokenizer.context_length)

    def _content_ids(self, text: str) -> list[int]:
        if isinstance(self.tokenizer, HFTokenizer):
            cleaned = self.tokenizer.clean_fn(text)
            return self.tokenizer.tokenizer(cleaned, add_special_tokens=False)["input_ids"]
        return self.tokenizer.encode(text)

    def count(self, text: str) -> int:
        """Tokens of `text` with the start and end tokens."""
        return len(self._content_ids(text)) + 2

    def kept(self, text: str) -> str:
        """The part of `text` that fits the context, decoded back to text."""
        ids = self._content_ids(text)[: self.context_length - 2]
        if isinstance(self.tokenizer, HFTokenizer):
            return self.tokenizer.tokenizer.decode(ids)
        return self.tokenizer.decode(ids).strip()


def load_text_budget(name: str, pretrained: str | None = None) -> TextBudget:
    """The text budget of an open_clip model, from its tokenizer alone (no weights are loaded)."""
    resolve_model_config(name)  # a clear error for unknown names
    return TextBudget(open_clip.get_tokenizer(name))


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
        raise ModelLoadError("visual_layers is set but the visual tower has no numbered transformer blocks")
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

    def __init__(self, module: torch.nn.Module, tokenizer: Any, model_cfg: dict[str, Any], device: str = "cpu",
                 arch: str | None = None, base_model: str | None = None):
        self.module = module.to(device)
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.arch = arch  # built-in open_clip name of the architecture (None: not built in)
        self.base_model = base_model  # what the weights started from, as the user named it
        self.device = device
        pp = open_clip.get_model_preprocess_cfg(module)
        size = pp.get("size", 224)
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.mean = torch.tensor(pp["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pp["std"], device=device).view(1, 3, 1, 1)
        self.vision_layers = len(self.vision_blocks())
        self._token_row = functools.lru_cache(maxsize=TOKEN_CACHE_SIZE)(self._tokenize_one)
        self._to_pixels = square_pixels(self.image_size)
        self.resize_rule = SQUARE_RESIZE.format(size=self.image_size)

    @classmethod
    def load(cls, name: str, pretrained: str | None = None, device: str = "cpu", tokenizer: Any = None) -> "OpenClipModel":
        """Build from an open_clip name plus tag/file, a 'local-dir:' folder or an 'hf-hub:' id.

        A tag trained with QuickGELU (OpenAI's) gets it even under the plain name: open_clip 3
        only warns about the mismatch, and GELU on those weights loses accuracy.
        """
        model_cfg = resolve_model_config(name)
        check_pretrained(name, pretrained)
        quick_gelu = needs_quick_gelu(name, pretrained, model_cfg)
        if quick_gelu:
            model_cfg["quick_gelu"] = True
        module = open_clip.create_model(name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu)
        arch, base_model = describe_source(name, pretrained, model_cfg)
        tokenizer = tokenizer or open_clip.get_tokenizer(name)
        return wrapper_class(module, cls)(module, tokenizer, model_cfg, device, arch, base_model)

    @classmethod
    def from_config(cls, model_cfg: dict[str, Any], device: str = "cpu", name: str | None = None,
                    tokenizer: Any = None) -> "OpenClipModel":
        """A random-init model from an architecture config dict (tests, demo pretraining,
        benchmarks); `name` is its built-in open_clip name when known (else looked up), `tokenizer`
        replaces the one the config implies."""
        model_cfg = copy.deepcopy(model_cfg)
        module = random_init_module(model_cfg)
        open_clip.set_model_preprocess_cfg(module, {
            "size": module.visual.image_size,
            "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD,
            "interpolation": "bicubic", "resize_mode": "shortest",
        })
        arch = builtin_arch(model_cfg, name)
        base_model = f"random init ({arch or name or 'custom config'})"
        return wrapper_class(module, cls)(module, tokenizer or build_tokenizer(model_cfg), model_cfg, device, arch,
                                          base_model)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._to_pixels(image.convert("RGB"))

    def _tokenize_one(self, text: str) -> torch.Tensor:
        return self.tokenizer([text])[0]

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(T, context) token ids; each distinct text is tokenized once per model and then
        remembered (pretraining and evaluation repeat most of their texts)."""
        return torch.stack([self._token_row(text) for text in texts]).to(self.device)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def encode_images(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.module.encode_image(self.normalize(pixels.to(self.device)))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_texts(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        features = self.module.encode_text(self.tokenize(texts))
        return F.normalize(features, dim=-1) if normalize else features

    def text_targets(self, texts: list[str]) -> torch.Tensor:
        """(T, D) normalized text embeddings."""
        return self.encode_texts(texts)

    def score_targets(self, pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, T) cosine similarities of the images to the text embeddings `targets`."""
        return self.encode_images(pixels) @ targets.T

    def score_pairs(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return (self.encode_images(pixels) * self.encode_texts(texts)).sum(-1)

    def vision_blocks(self) -> torch.nn.ModuleList:
        """The vision tower's transformer blocks, batch-first tokens (B, N, W): open_clip's ViT,
        or a timm ViT trunk (BiomedCLIP); empty for a convolutional tower."""
        visual = self.module.visual
        if hasattr(visual, "transformer"):
            return visual.transformer.resblocks
        if hasattr(getattr(visual, "trunk", None), "blocks"):
            return visual.trunk.blocks
        return torch.nn.ModuleList()

    def vision_token_grid(self) -> tuple[int, int, int]:
        """(prefix tokens, patch rows, patch columns) of the vision blocks' tokens: open_clip's ViT
        (a class token unless it has none), or a timm trunk (its `num_prefix_tokens`)."""
        visual = self.module.visual
        if hasattr(visual, "transformer"):
            rows, cols = visual.grid_size
            return int(getattr(visual, "class_embedding", None) is not None), int(rows), int(cols)
        trunk = getattr(visual, "trunk", None)
        if hasattr(trunk, "blocks"):
            rows, cols = trunk.patch_embed.grid_size
            return int(trunk.num_prefix_tokens), int(rows), int(cols)
        raise ValueError(f"{self.arch or type(self.module.visual).__name__}: its vision tower has no transformer blocks, so it has no token grid")

    def encode_images_through(self, pixels: torch.Tensor, layer: int,
                              edit: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Normalized (B, D) embeddings with block `layer`'s output tokens replaced by `edit(tokens)`
        (a forward hook on that block, removed afterwards)."""
        blocks = self.vision_blocks()
        if not 0 <= layer < len(blocks):
            raise ValueError(f"vision layer {layer} out of range: the model has {len(blocks)} blocks")
        handle = blocks[layer].register_forward_hook(lambda module, args, output: edit(output))
        try:
            return self.encode_images(pixels)
        finally:
            handle.remove()

    def text_target(self, text: str, similarity: str = "cosine") -> torch.Tensor:
        """(D,) the text's embedding: normalized for cosine, raw for l2 (authors' BiomedCLIP code)."""
        with torch.no_grad():
            return self.encode_texts([text], normalize=similarity == "cosine").reshape(-1)

    def similarity(self, pixels: torch.Tensor, target: torch.Tensor, similarity: str = "cosine") -> torch.Tensor:
        """(N,) cosine to the target, or minus the L2 distance of the raw embeddings."""
        if similarity == "l2":
            return -(self.encode_images(pixels, normalize=False) - target).norm(dim=-1)
        return self.encode_images(pixels) @ target

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
        """Write a local-dir folder; its weights file also loads under the built-in name
        recorded as "arch" (`create_model_and_transforms(arch, pretrained=<file>)`)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "model_cfg": self.model_cfg,
            "preprocess_cfg": open_clip.get_model_preprocess_cfg(self.module),
            "arch": self.arch,
            "base_model": self.base_model,
        }
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=list) + "\n")
        save_file(state_for_saving(self.module), str(out_dir / WEIGHTS_FILE))
        if hasattr(self.tokenizer, "save_pretrained"):  # an hf tokenizer (get_tokenizer("local-dir:") reads it), a
            self.tokenizer.save_pretrained(out_dir)  # demo CoCa's vocabulary (ktpipe.demo.models.CompactTokenizer)
