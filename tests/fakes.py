"""Fake model families and a fake task that prove the interfaces take new kinds without a branch:
a cross-encoder that only scores image-text pairs (no embeddings), as ViLT does; a captioner that
generates text from pixels, as CoCa does; and a second evaluation task that reads images with
reference captions. Tests register them (`BACKENDS`, `TASKS`) and run the ordinary stage
functions through them. Not a test module."""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import load_file, save_file

from ktpipe.eval.base import TaskInput
from ktpipe.models import CROSS_ENCODER, LOCAL_DIR, ModelLoadError

WEIGHTS = "fake_model.safetensors"
WORDS = ("red", "green", "blue", "circle", "square", "ring")  # the fake captioner's vocabulary


class FakeImageModel:
    """What every fake shares: 16 px pixels in [0, 1], a tiny conv net, save and load by folder."""

    image_size = 16
    resize_rule = "resized to 16x16 (PIL's default filter)"

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return TF.to_tensor(image.convert("RGB").resize((self.image_size, self.image_size)))

    def tower_parameters(self, tower: str, last_blocks: int | None = None):
        return [p for name, p in self.module.named_parameters() if tower == "both" or name.startswith(tower)]

    def save(self, out_dir: Path) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_file(self.module.state_dict(), str(Path(out_dir) / WEIGHTS))

    @classmethod
    def load(cls, name: str, pretrained: str | None = None, device: str = "cpu"):
        """The backend loader: a fresh seeded model, or a saved folder as 'local-dir:<folder>'."""
        model = cls()
        if name.startswith(LOCAL_DIR):
            path = Path(name[len(LOCAL_DIR):]) / WEIGHTS
            if not path.is_file():
                raise ModelLoadError(f"fake checkpoint not found: {path}")
            model.module.load_state_dict(load_file(str(path)))
        return model


def vision_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 8))


class FakeCrossEncoder(FakeImageModel):
    """Scores a pair from a tiny conv net on the pixels and a character-embedding bag of the text."""

    kind = CROSS_ENCODER

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        super().__init__(torch.nn.ModuleDict({"visual": vision_net(), "text": torch.nn.Embedding(256, 8)}))

    def _text(self, texts: list[str]) -> torch.Tensor:
        ids = [torch.tensor([min(ord(c), 255) for c in text]) for text in texts]
        return torch.stack([self.module["text"](i).mean(0) for i in ids])  # (T, 8)

    def text_targets(self, texts: list[str]) -> list[str]:
        return list(texts)  # a cross-encoder reads the texts with every image

    def score_targets(self, pixels: torch.Tensor, targets: list[str]) -> torch.Tensor:
        return self.module["visual"](pixels) @ self._text(targets).T  # (B, T): every image with every text

    def score_pairs(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return (self.module["visual"](pixels) * self._text(texts)).sum(-1)  # (B,)

    def text_target(self, text: str, similarity: str = "cosine") -> str:
        return text

    def similarity(self, pixels: torch.Tensor, target: str, similarity: str = "cosine") -> torch.Tensor:
        return self.score_pairs(pixels, [target] * pixels.shape[0])


class FakeCaptioner(FakeCrossEncoder):
    """A cross-encoder that also captions: each image gets the vocabulary word its pixels score
    highest with, so training toward a caption changes what it says."""

    def generate_captions(self, pixels: torch.Tensor, **settings) -> list[str]:
        with torch.no_grad():
            best = self.score_targets(pixels, list(WORDS)).argmax(-1)  # (B,)
        return [f"a {WORDS[int(i)]}" for i in best]


class FakeCaptionMatch:
    """A second task on images with reference captions: the share of images whose generated
    caption shares a word with one of its references, and the mean caption length."""

    name = "caption_match"
    record_kind = "captioned"

    def evaluate(self, model, data: TaskInput, progress: bool = True) -> dict[str, float]:
        pixels = torch.stack([model.preprocess(Image.open(p)) for p in data.manifest.paths])
        captions = model.generate_captions(pixels)
        hits = [bool(set(c.split()[1:]) & {w for ref in r.captions for w in ref.split()})
                for c, r in zip(captions, data.manifest.records)]
        return {"match": sum(hits) / len(hits), "mean_words": sum(len(c.split()) for c in captions) / len(captions)}

    def summary(self, metrics: dict[str, float], concepts) -> dict[str, float]:
        return {"match": metrics["match"]}

    def report_table(self, results: dict[str, dict[str, float]], concepts) -> list[str]:
        return ["| Model | match |", "|---|---|", *(f"| {m} | {r['match']:.2f} |" for m, r in results.items())]
