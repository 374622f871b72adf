"""The demo backends: a tiny open_clip CLIP pretrained from scratch on the demo world (`demo`), and
a tiny open_clip CoCa started from it and taught to caption the world (`demo_coca`)."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ktpipe.models.base import ModelLoadError
import torch
from safetensors.torch import load_file

from ktpipe.models.openclip import CONFIG_FILE, LOCAL_DIR, WEIGHTS_FILE, OpenClipModel, TextBudget, build_tokenizer

DEMO_ARCH = "ktpipe-demo"
DEMO_COCA_ARCH = "ktpipe-demo-coca"


def demo_config(arch: str = DEMO_ARCH) -> dict:
    """A packaged demo architecture: the CLIP (ViT patch 8, width 96, 3 layers; text width 64,
    2 layers) or the CoCa (the same towers, an attentional pooler of 16 queries, a 1-block decoder)."""
    text = (resources.files("ktpipe.models") / "configs" / f"{arch}.json").read_text()
    return json.loads(text)


def build_demo_model(device: str = "cpu") -> OpenClipModel:
    """A random-init demo model, the starting point of demo pretraining."""
    return OpenClipModel.from_config(demo_config(), device)


# CLIP key -> CoCa key of what a demo CoCa takes from the demo CLIP: the vision stem and blocks
# (its pooling and projection differ) and the whole text tower
CLIP_TO_COCA = (("visual.conv1.", "visual.conv1."), ("visual.class_embedding", "visual.class_embedding"),
                ("visual.positional_embedding", "visual.positional_embedding"), ("visual.ln_pre.", "visual.ln_pre."),
                ("visual.transformer.", "visual.transformer."), ("token_embedding.", "text.token_embedding."),
                ("positional_embedding", "text.positional_embedding"), ("transformer.", "text.transformer."),
                ("ln_final.", "text.ln_final."), ("text_projection", "text.text_projection"),
                ("logit_scale", "logit_scale"))


VOCABULARY_FILE = "vocabulary.json"


class CompactTokenizer:
    """open_clip's SimpleTokenizer kept to a list of its token ids: the demo CoCa's vocabulary.

    The decoder of a CoCa predicts a distribution over the whole vocabulary at every position;
    over CLIP's 49,408 tokens that output layer would cost more than the rest of the demo model,
    so the demo CoCa knows only the tokens of its world (`demo_vocabulary`). Token i of the model
    is BPE token `token_ids[i]`; index 0 stays BPE id 0 (the padding id), and a token outside
    the list reads as the last index, `<unk>`.
    """

    def __init__(self, token_ids: list[int], context_length: int):
        import open_clip

        self.bpe = open_clip.SimpleTokenizer(context_length=context_length)
        if not token_ids or token_ids[0] != 0:
            raise ModelLoadError("a demo CoCa vocabulary starts with token id 0 (the padding id)")
        self.token_ids = list(token_ids)
        self.unk = len(self.token_ids)
        self.vocab_size = self.unk + 1
        self.lookup = torch.full((len(self.bpe.encoder),), self.unk, dtype=torch.long)
        self.lookup[torch.tensor(self.token_ids)] = torch.arange(len(self.token_ids))
        self.context_length = context_length
        self.sot_token_id = int(self.lookup[self.bpe.sot_token_id])
        self.eot_token_id = int(self.lookup[self.bpe.eot_token_id])

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        return self.lookup[self.bpe(texts, context_length or self.context_length)]

    def encode(self, text: str) -> list[int]:
        return self.lookup[torch.tensor(self.bpe.encode(text), dtype=torch.long)].tolist()

    def decode(self, ids: list[int]) -> str:
        words = [self.bpe.decode([self.token_ids[i]]) if i < self.unk else "<unk> " for i in ids]
        return "".join(words)

    def save_pretrained(self, folder: Path) -> None:
        (Path(folder) / VOCABULARY_FILE).write_text(json.dumps(self.token_ids) + "\n")

    @classmethod
    def from_folder(cls, folder: Path, context_length: int) -> "CompactTokenizer":
        path = Path(folder) / VOCABULARY_FILE
        if not path.is_file():
            raise ModelLoadError(f"demo CoCa checkpoint {folder} has no {VOCABULARY_FILE}")
        return cls(json.loads(path.read_text()), context_length)


def demo_vocabulary(texts: list[str]) -> list[int]:
    """The BPE token ids of `texts` with padding (0) first and the start and end tokens."""
    import open_clip

    bpe = open_clip.SimpleTokenizer()
    ids = {bpe.sot_token_id, bpe.eot_token_id} | {i for text in texts for i in bpe.encode(text)}
    return [0, *sorted(ids - {0})]


def build_demo_coca(vocabulary: list[int], init_from: Path | None = None, device: str = "cpu") -> OpenClipModel:
    """A random-init demo CoCa over `vocabulary` (BPE token ids, `demo_vocabulary`); with
    `init_from` (a demo CLIP checkpoint folder), its vision stem and blocks and its text tower
    start as that CLIP's, token embeddings taken at the vocabulary's ids."""
    config = demo_config(DEMO_COCA_ARCH)
    tokenizer = CompactTokenizer(vocabulary, config["text_cfg"]["context_length"])
    config["text_cfg"]["vocab_size"] = config["multimodal_cfg"]["vocab_size"] = tokenizer.vocab_size
    model = OpenClipModel.from_config(config, device, tokenizer=tokenizer)
    if init_from is not None:
        weights = Path(init_from) / WEIGHTS_FILE
        if not weights.is_file():
            raise ModelLoadError(f"params key 'pretrain.init_from': no demo CLIP checkpoint at {init_from} "
                                 f"(no {WEIGHTS_FILE}); run `dvc repro base_model` first")
        clip = load_file(str(weights))
        embedding = clip["token_embedding.weight"]
        clip["token_embedding.weight"] = torch.cat([embedding[vocabulary], embedding.new_zeros(1, embedding.shape[1])])
        state = model.module.state_dict()
        copied = {coca + key[len(old):]: value for key, value in clip.items()
                  for old, coca in CLIP_TO_COCA if key.startswith(old)}
        wrong = [k for k, v in copied.items() if k not in state or state[k].shape != v.shape]
        if wrong:
            raise ModelLoadError(f"{init_from} is not a demo CLIP checkpoint: {wrong[:3]} do not fit the demo CoCa")
        with torch.no_grad():
            for key, value in copied.items():
                state[key].copy_(value)
    return model


def load_demo_text_budget(name: str, pretrained: str | None = None) -> TextBudget:
    """The demo text tower's budget (context 24), from the packaged architecture config."""
    return TextBudget(build_tokenizer(demo_config()))


def load_demo_coca_text_budget(name: str, pretrained: str | None = None) -> TextBudget:
    """The demo CoCa's text budget (the demo CLIP's tokenizer, context 24)."""
    return TextBudget(build_tokenizer(demo_config(DEMO_COCA_ARCH)))


def demo_checkpoint(arch: str, name: str, pretrained: str | None, stage: str) -> Path:
    """The checkpoint folder a demo backend loads: `pretrained` under the architecture's name, or
    a fine-tuned checkpoint as 'local-dir:<folder>'."""
    if name.startswith(LOCAL_DIR):  # a fine-tuned demo checkpoint
        folder = Path(name[len(LOCAL_DIR):])
    elif name == arch and pretrained:
        folder = Path(pretrained)
    else:
        raise ModelLoadError(
            f"this demo backend takes name {arch!r} with pretrained=<checkpoint folder>, "
            f"or 'local-dir:<folder>'; got name={name!r}, pretrained={pretrained!r}"
        )
    if not (folder / CONFIG_FILE).is_file():
        raise ModelLoadError(
            f"demo checkpoint not found at {folder} (no {CONFIG_FILE}); run `dvc repro {stage}` first"
        )
    return folder


def load_demo_model(name: str, pretrained: str | None, device: str = "cpu") -> OpenClipModel:
    """Load the pretrained demo CLIP from the checkpoint folder the base_model stage wrote."""
    folder = demo_checkpoint(DEMO_ARCH, name, pretrained, "base_model")
    return OpenClipModel.load(f"{LOCAL_DIR}{folder}", device=device)


def load_demo_coca(name: str, pretrained: str | None, device: str = "cpu") -> OpenClipModel:
    """Load the pretrained demo CoCa (open_clip weights, its vocabulary file) from the checkpoint
    folder the base_model_coca stage wrote, or a fine-tuned one."""
    folder = demo_checkpoint(DEMO_COCA_ARCH, name, pretrained, "base_model_coca")
    tokenizer = CompactTokenizer.from_folder(folder, demo_config(DEMO_COCA_ARCH)["text_cfg"]["context_length"])
    return OpenClipModel.load(f"{LOCAL_DIR}{folder}", device=device, tokenizer=tokenizer)
