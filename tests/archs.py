"""Random-init open_clip architectures at their real input sizes, saved as local-dir folders.

Tests use them to check loading, tokenizers and the tower split on the architectures the paper
uses (ViT-B/32, ViT-L/14 and BiomedCLIP) without downloading any weights. Not a test module.
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


def write_tiny_bert(folder: Path) -> Path:
    """A two-layer, 32-wide BERT config plus a BERT word-piece tokenizer (vocab.txt and
    tokenizer.json), written with transformers' own classes; no weights (open_clip builds
    the text tower from the config and loads the CLIP checkpoint over it)."""
    from transformers import BertConfig, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL_TOKENS + WORDS + [c for c in LETTERS if c not in WORDS] + [f"##{c}" for c in LETTERS]
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


def save_random_checkpoint(arch: str, folder: Path, seed: int = 0) -> Path:
    """A random-init `arch` at its real input size, saved as a local-dir folder that
    `OpenClipModel.load(f"local-dir:{folder}")` reads offline; returns the folder."""
    from ktpipe.models import OpenClipModel

    folder = Path(folder)
    config = arch_config(arch, folder)
    torch.manual_seed(seed)
    OpenClipModel.from_config(config, name=None if arch == "biomedclip" else arch).save(folder)
    return folder


ARCHS = ("ViT-B-32", "ViT-L-14", "biomedclip")
EMBED_DIMS = {"ViT-B-32": 512, "ViT-L-14": 768, "biomedclip": 512}
