"""Zero-shot classification with prompt-template ensembling.

Every image of the evaluated concepts is classified among all concepts, once with name
prompts ("a photo of a blicket.") and once with the description as the class prompt.
Accuracy is reported per class and pooled over novel (target) and known (retention) classes.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ktpipe.captions import ConceptText
from ktpipe.eval.metrics import accuracy, per_class_accuracy
from ktpipe.images import list_image_folder, open_image
from ktpipe.models import ImageTextModel
from ktpipe.params import EvaluateParams
from ktpipe.templates import load_templates

GROUPS = {"target": "novel", "retention": "known"}


def name_prompts(concept: ConceptText, templates: list[str]) -> list[str]:
    """Template ensemble over the concept's name and aliases (or its prompt override)."""
    if concept.prompt:
        return [concept.prompt]
    return [t.format(name) for name in (concept.name, *concept.aliases) for t in templates]


def description_prompts(concept: ConceptText) -> list[str]:
    """The description itself as the class prompt (the description-prompt baseline)."""
    return [concept.description.rstrip(".") + "."]


@torch.no_grad()
def class_embeddings(model: ImageTextModel, prompts: list[list[str]]) -> torch.Tensor:
    """(K, D): per class, the renormalized mean of its prompts' embeddings."""
    rows = [F.normalize(model.encode_texts(p).mean(0), dim=-1) for p in prompts]
    return torch.stack(rows)


@torch.no_grad()
def embed_folder(model: ImageTextModel, items: list[tuple[Path, int]], batch_size: int, progress: bool):
    """(N, D) image embeddings and (N,) labels for an image list."""
    feats, labels = [], []
    for start in tqdm(range(0, len(items), batch_size), desc="embed images", disable=not progress, leave=False):
        chunk = items[start:start + batch_size]
        pixels = torch.stack([model.preprocess(open_image(p)) for p, _ in chunk])
        feats.append(model.encode_images(pixels).cpu())
        labels += [label for _, label in chunk]
    return torch.cat(feats), torch.tensor(labels)


def score(pred: torch.Tensor, labels: torch.Tensor, concepts: list[ConceptText], prefix: str) -> dict[str, float]:
    """Flat metrics: overall accuracy, pooled accuracy per group and accuracy per class."""
    out: dict[str, float] = {f"{prefix}_overall_acc": accuracy(pred, labels)}
    for group, role in GROUPS.items():
        ids = torch.tensor([k for k, c in enumerate(concepts) if c.role == role])
        mask = torch.isin(labels, ids) if len(ids) else torch.zeros_like(labels, dtype=torch.bool)
        if mask.any():
            out[f"{prefix}_{group}_acc"] = accuracy(pred[mask], labels[mask])
    for concept, acc in zip(concepts, per_class_accuracy(pred, labels, len(concepts))):
        if acc is not None:
            out[f"{prefix}_class_{concept.name}_acc"] = acc
    return out


def evaluate(
    model: ImageTextModel, data: Path, concepts: list[ConceptText], params: EvaluateParams, progress: bool = True
) -> dict[str, float]:
    """Zero-shot accuracy on data/<concept>/ images, with name and with description prompts."""
    model.module.eval()
    items = list_image_folder(Path(data), [c.name for c in concepts])
    image_emb, labels = embed_folder(model, items, params.batch_size, progress)
    templates = load_templates(params.templates)
    metrics: dict[str, float] = {"n_images": float(len(items))}
    for kind, prompts in (
        ("name", [name_prompts(c, templates) for c in concepts]),
        ("description", [description_prompts(c) for c in concepts]),
    ):
        logits = image_emb @ class_embeddings(model, prompts).cpu().T  # (N, K)
        metrics.update(score(logits.argmax(-1), labels, concepts, kind))
    return metrics
