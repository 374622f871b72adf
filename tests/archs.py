"""Random-init open_clip architectures at their real input sizes, saved as local-dir folders.

Tests use them to check loading, tokenizers and the tower split on the architectures the paper
uses (ViT-B/32, ViT-L/14, BiomedCLIP and CoCa ViT-L/14) without downloading any weights. Not a test module.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import open_clip
import torch

# The open_clip config published with BiomedCLIP (open_clip_config.json of
# hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224), copied as data. Its
# PubMedBERT config and tokenizer cannot be downloaded here, so `biomedclip_config` swaps
# `hf_model_name` / `hf_tokenizer_name` for a tiny BERT folder written offline
# (`write_tiny_bert`); the vision tower and every other field are the published ones.
BIOMEDCLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 512,
    "vision_cfg": {
        "timm_model_name": "vit_base_patch16_224",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "image_size": 224,
    },
    "text_cfg": {
        "hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
        "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
        "hf_proj_type": "mlp",
        "hf_pooler_type": "cls_last_hidden_state_pooler",
        "context_length": 256,
    },
}

# A word-piece vocabulary just big enough to tokenize the tests' prompts.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = "a an the of and with photo image chest x ray lung heart scan normal pneumonia tumor".split()
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]


def write_tiny_bert(folder: Path, words: tuple[str, ...] = ()) -> Path:
    """A two-layer, 32-wide BERT config plus a BERT word-piece tokenizer (vocab.txt and
    tokenizer.json), written with transformers' own classes; no weights (open_clip builds
    the text tower from the config and loads the CLIP checkpoint over it). `words` join the
    vocabulary as whole words (others are spelled letter by letter)."""
    from transformers import BertConfig, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    whole = list(dict.fromkeys([*WORDS, *words]))
    vocab = SPECIAL_TOKENS + whole + [c for c in LETTERS if c not in whole] + [f"##{c}" for c in LETTERS]
    vocab += [c for c in ".,;:'()-/" if c not in vocab]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast.from_pretrained(folder).save_pretrained(folder)
    BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=512).save_pretrained(folder)
    return folder


def biomedclip_config(text_folder: Path) -> dict[str, Any]:
    """The published BiomedCLIP config with its text tower pointed at a local BERT folder."""
    config = copy.deepcopy(BIOMEDCLIP_CONFIG)
    config["text_cfg"]["hf_model_name"] = str(Path(text_folder).resolve())
    config["text_cfg"]["hf_tokenizer_name"] = str(Path(text_folder).resolve())
    return config


def arch_config(arch: str, folder: Path) -> dict[str, Any]:
    """The open_clip config of `arch`; BiomedCLIP's tiny text tower is written into `folder`."""
    if arch == "biomedclip":
        return biomedclip_config(write_tiny_bert(folder))
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"unknown test architecture {arch!r}; use one of {ARCHS}")
    return config


def concept_words() -> tuple[str, ...]:
    """Every lower-cased word of the packaged concept files and prompt templates, so that a test
    tokenizer counts their tokens about as BERT's word pieces do (ViLT's 40-token limit)."""
    import re

    repo = Path(__file__).resolve().parents[1]
    files = [*(repo / "captions").glob("*.yaml"), *(repo / "ktpipe/data/templates").glob("*.txt")]
    return tuple(sorted({w for f in files for w in re.findall(r"[a-z0-9]+", f.read_text().lower())}))


VILT_HEADS = ("retrieval", "itm", "none")  # rank_output, ViLT pretraining's two-way head, or neither
TINY_VILT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "image_size": 32, "patch_size": 16}


def write_vilt(folder: Path, head: str = "retrieval", mlm: bool = False, seed: int = 0,
               shape: dict[str, Any] | None = None) -> Path:
    """A random-init ViLT in transformers' layout with a word-piece tokenizer (`write_tiny_bert`'s
    vocabulary); `shape` overrides ViltConfig (None: the tiny 2-layer, 32-wide ViLT at 32 px;
    {} is ViltConfig's default, ViLT-B/32 at 384 px with its 30,522-word embedding). `head` is a
    retrieval head (rank_output), ViLT's two-way ITM head instead, or none; `mlm` adds ViLT's
    masked-language-modelling head (`mlm_score.*`, decoder tied to the word embeddings: left out)."""
    from safetensors.torch import load_file, save_file
    from transformers import BertTokenizerFast, ViltConfig, ViltForImageAndTextRetrieval, ViltImageProcessor, ViltProcessor
    from transformers.models.vilt.modeling_vilt import ViltMLMHead

    folder = Path(folder)
    words = () if shape is None else concept_words()  # a real-size ViLT reads the paper's captions
    tokenizer = BertTokenizerFast.from_pretrained(write_tiny_bert(folder / "bert", words))
    shape = TINY_VILT if shape is None else shape
    config = ViltConfig(**{"vocab_size": tokenizer.vocab_size, **shape}) if shape is TINY_VILT else ViltConfig(**shape)
    torch.manual_seed(seed)
    ViltForImageAndTextRetrieval(config).save_pretrained(folder, safe_serialization=True)
    ViltProcessor(ViltImageProcessor(), tokenizer).save_pretrained(folder)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    if head != "retrieval":
        for key in ("rank_output.weight", "rank_output.bias"):
            del state[key]
    generator = torch.Generator().manual_seed(seed + 1)
    if head == "itm":  # unit-variance logits from ViLT's tanh-pooled features, as a trained head gives
        state["itm_score.fc.weight"] = torch.randn(2, config.hidden_size, generator=generator) / config.hidden_size ** 0.5
        state["itm_score.fc.bias"] = torch.randn(2, generator=generator)
    if mlm:
        for key, value in ViltMLMHead(config).state_dict().items():
            if key != "decoder.weight":
                state[f"mlm_score.{key}"] = value.clone()
    save_file(state, str(weights), metadata={"format": "pt"})
    return folder


def save_random_checkpoint(arch: str, folder: Path, seed: int = 0) -> Path:
    """A random-init `arch` at its real input size, saved as a local-dir folder that
    `OpenClipModel.load(f"local-dir:{folder}")` reads offline; returns the folder."""
    from ktpipe.models import OpenClipModel

    if arch == "vilt-b32":
        return write_vilt(folder, head="itm", mlm=True, seed=seed, shape={})
    folder = Path(folder)
    config = arch_config(arch, folder)
    torch.manual_seed(seed)
    OpenClipModel.from_config(config, name=None if arch == "biomedclip" else arch).save(folder)
    return folder


ARCHS = ("ViT-B-32", "ViT-L-14", "biomedclip", "coca_ViT-L-14")  # open_clip architectures (CoCa: Tables 6 and 9)
VILT_B32 = "vilt-b32"  # ViLT-B/32 at 384 px with ITM and MLM heads, as dandelin/vilt-b32-mlm-itm
EMBED_DIMS = {"ViT-B-32": 512, "ViT-L-14": 768, "biomedclip": 512, "coca_ViT-L-14": 768}
