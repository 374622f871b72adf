"""The demo cross-encoder backend: a tiny ViLT pretrained on the demo world (ktpipe.demo.pretrain_cross),
served by the ViLT backend (ktpipe.models.vilt) from the checkpoint folder pretraining writes.

Its WordPiece vocabulary holds the words it is given (the world's) plus every letter and digit,
alone and as a '##' continuation, so any lowercase word has a spelling: a name the vocabulary
lacks (a novel concept's) is read as its letters. Its vision side can start from the demo
CLIP's vision tower, which has the same shape (as ViLT starts from an ImageNet ViT).
"""
from __future__ import annotations

import json
import tempfile
from importlib import resources
from pathlib import Path

import torch

from ktpipe.models import LOCAL_DIR
from ktpipe.models.base import ModelLoadError
from ktpipe.models.vilt import MLM_HEAD, ViltCrossEncoder, ViltTextBudget

DEMO_VILT_ARCH = "ktpipe-demo-vilt"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PUNCTUATION = list(".,;:'\"!?-()")
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]


class DemoViltCrossEncoder(ViltCrossEncoder):
    """The ViLT backend with the demo's own setup, which its committed results used: square 32 px
    crops instead of ViLT's image processor, and every masked word [MASK]."""

    keeps_aspect = False
    replace_split = (1.0, 0.0)


def demo_vilt_file() -> dict:
    """The packaged demo ViLT file: its architecture (hidden 96, 3 blocks of 3 heads, 32 px images
    in 8 px patches: the demo CLIP vision tower's shape; texts of 40 tokens) and `words`, the demo
    world's caption words every demo ViLT vocabulary holds."""
    text = (resources.files("ktpipe.models") / "configs" / f"{DEMO_VILT_ARCH}.json").read_text()
    return json.loads(text)


def demo_vilt_config() -> dict:
    """The demo ViLT's `ViltConfig` arguments, without the vocabulary size."""
    return {key: value for key, value in demo_vilt_file().items() if key != "words"}


def word_vocabulary(words: set[str]) -> list[str]:
    """Special tokens, punctuation, letters and digits (alone and as '##' pieces), the packaged
    caption words, then `words`."""
    pieces = LETTERS + [f"##{c}" for c in LETTERS]
    whole = {w.lower() for w in (*demo_vilt_file()["words"], *words)} - set(pieces)
    return SPECIAL_TOKENS + PUNCTUATION + pieces + sorted(whole)


def build_tokenizer(words: set[str]):
    """A lower-casing BERT WordPiece tokenizer over `word_vocabulary(words)` (the packaged words
    plus `words`)."""
    from transformers import BertTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab_file.write_text("\n".join(word_vocabulary(words)) + "\n")
        return BertTokenizerFast(str(vocab_file), do_lower_case=True,
                                 model_max_length=demo_vilt_config()["max_position_embeddings"])


def build_demo_vilt(words: set[str], vision_init: Path | None = None, device: str = "cpu") -> ViltCrossEncoder:
    """A random-init demo ViLT with a one-logit match head and an MLM head, its tokenizer over
    `words`; with `vision_init`, its vision side starts from that demo CLIP checkpoint."""
    from transformers import ViltConfig, ViltForImageAndTextRetrieval, ViltImageProcessor, ViltProcessor
    from transformers.models.vilt.modeling_vilt import ViltMLMHead

    tokenizer = build_tokenizer(words)
    config = ViltConfig(vocab_size=len(tokenizer.vocab), **demo_vilt_config())
    image_processor = ViltImageProcessor(size={"shortest_edge": config.image_size}, size_divisor=config.patch_size)
    module = ViltForImageAndTextRetrieval(config)
    module.add_module(MLM_HEAD.rstrip("."), ViltMLMHead(config))
    if vision_init is not None:
        copy_clip_vision_tower(module, Path(vision_init))
    return DemoViltCrossEncoder(module, ViltProcessor(image_processor, tokenizer), device, base_model=DEMO_VILT_ARCH)


def copy_clip_vision_tower(module: torch.nn.Module, clip_dir: Path) -> None:
    """Start ViLT's patch embedding, class token, position embeddings, blocks and final norm from
    the open_clip ViT of the demo CLIP checkpoint at `clip_dir`; the attention's packed q/k/v
    projection splits into ViLT's query, key and value. CLIP's norm before the first block has
    no ViLT counterpart and is left out; the patch projection's bias (CLIP has none) is zero."""
    from ktpipe.demo.models import load_demo_model

    if not (clip_dir / "open_clip_config.json").is_file():
        raise ModelLoadError(f"params key 'pretrain.init_from': no demo CLIP checkpoint at {clip_dir}; "
                             "run the base_model stage of the demo CLIP first")
    clip = load_demo_model(f"{LOCAL_DIR}{clip_dir}", None).module.visual.state_dict()
    pairs = {"vilt.embeddings.patch_embeddings.projection.weight": clip["conv1.weight"],
             "vilt.embeddings.cls_token": clip["class_embedding"].view(1, 1, -1),
             "vilt.embeddings.position_embeddings": clip["positional_embedding"][None],
             "vilt.layernorm.weight": clip["ln_post.weight"], "vilt.layernorm.bias": clip["ln_post.bias"]}
    names = {"attention.output.dense": "attn.out_proj", "layernorm_before": "ln_1", "layernorm_after": "ln_2",
             "intermediate.dense": "mlp.c_fc", "output.dense": "mlp.c_proj"}
    for i in range(module.config.num_hidden_layers):
        ours, theirs = f"vilt.encoder.layer.{i}.", f"transformer.resblocks.{i}."
        if f"{theirs}ln_1.weight" not in clip:
            raise ModelLoadError(f"the demo CLIP at {clip_dir} has fewer vision blocks than the demo ViLT's "
                                 f"{module.config.num_hidden_layers}")
        for kind in ("weight", "bias"):
            packed = clip[f"{theirs}attn.in_proj_{kind}"].chunk(3)
            for projection, value in zip(("query", "key", "value"), packed):
                pairs[f"{ours}attention.attention.{projection}.{kind}"] = value
            for vilt_name, clip_name in names.items():
                pairs[f"{ours}{vilt_name}.{kind}"] = clip[f"{theirs}{clip_name}.{kind}"]
    state = module.state_dict()
    with torch.no_grad():
        for name, value in pairs.items():
            if state[name].shape != value.shape:
                raise ModelLoadError(f"cannot start the demo ViLT's {name} {tuple(state[name].shape)} from the demo "
                                     f"CLIP's {tuple(value.shape)}: the architectures differ")
            state[name].copy_(value)
        state["vilt.embeddings.patch_embeddings.projection.bias"].zero_()


def checkpoint_folder(name: str, pretrained: str | None) -> Path:
    """The folder of `name` 'ktpipe-demo-vilt' with pretrained=<folder>, or 'local-dir:<folder>'."""
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR):])
    elif name == DEMO_VILT_ARCH and pretrained:
        folder = Path(pretrained)
    else:
        raise ModelLoadError(f"demo_vilt backend takes name {DEMO_VILT_ARCH!r} with pretrained=<checkpoint folder>, "
                             f"or 'local-dir:<folder>'; got name={name!r}, pretrained={pretrained!r}")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"demo ViLT checkpoint not found at {folder} (no config.json); run its base_model "
                             "stage first")
    return folder


def load_demo_vilt(name: str, pretrained: str | None, device: str = "cpu") -> ViltCrossEncoder:
    """The pretrained (or fine-tuned) demo ViLT from its checkpoint folder."""
    return DemoViltCrossEncoder.load(str(checkpoint_folder(name, pretrained)), device=device)


def load_demo_vilt_text_budget(name: str, pretrained: str | None = None) -> ViltTextBudget:
    """The demo ViLT's text budget (40 tokens) from its checkpoint's tokenizer; before pretraining,
    from a tokenizer over the packaged words alone (it spells every name in letters, so it counts
    at least as many tokens as the pretrained one, which also holds the known concepts' names)."""
    from ktpipe.models.vilt import load_vilt_text_budget

    try:
        return load_vilt_text_budget(str(checkpoint_folder(name, pretrained)))
    except ModelLoadError:
        return ViltTextBudget(build_tokenizer(set()), demo_vilt_config()["max_position_embeddings"])
