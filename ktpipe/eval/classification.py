"""Zero-shot classification with prompt-template ensembling.

Each image of a set is classified among the set's classes plus the classes of any sets named
in its `extra_classes` (Table 1 classifies a moongate among the novel concepts and ImageNet's
1000 classes). A class that is one of the experiment's concepts is prompted with its name
and aliases; it counts as *target* when novel, *retention* when known. Every other class
counts as retention. When every candidate is a described concept, the description itself
is also tried as the class prompt (the description-prompt baseline).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ktpipe.captions import ConceptText
from ktpipe.datasets import Manifest, normalize_class as normalize
from ktpipe.eval.metrics import accuracy, per_class_accuracy
from ktpipe.images import open_image
from ktpipe.models import ImageTextModel
from ktpipe.params import EvaluateParams

GROUPS = {"novel": "target", "known": "retention"}
PER_CLASS_LIMIT = 20  # sets with more classes report per-class accuracy for concepts only


@dataclass(frozen=True)
class Candidate:
    key: str  # metric key: the concept name, or the class name made key-safe
    prompts: tuple[str, ...]  # name prompts, ensembled
    description: str | None  # the concept's description (None for plain dataset classes)
    group: str  # target (novel concept) or retention (everything else)


def metric_key(name: str) -> str:
    """A class name as a metric key ('Pleural Effusion' -> 'pleural_effusion')."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def name_prompts(concept: ConceptText, templates: list[str]) -> list[str]:
    """Template ensemble over the concept's name and aliases (or its prompt override)."""
    if concept.prompt:
        return [concept.prompt]
    return [t.format(name) for name in (concept.text_name, *concept.aliases) for t in templates]


def description_prompt(description: str) -> str:
    """The description itself as the class prompt (the description-prompt baseline)."""
    return description.rstrip(".") + "."


def description_prompts(concept: ConceptText) -> list[str]:
    """The description prompt of a concept, as a one-prompt ensemble."""
    return [description_prompt(concept.description)]


def build_candidates(class_names: list[str], concepts: list[ConceptText], templates: list[str]) -> list[Candidate]:
    """One candidate per class name, prompted through its concept when it is one."""
    by_name = {normalize(n): c for c in concepts for n in (c.name, c.text_name)}
    out = []
    for name in class_names:
        concept = by_name.get(normalize(name))
        if concept is None:
            out.append(Candidate(metric_key(name), tuple(t.format(name) for t in templates), None, "retention"))
        else:
            out.append(Candidate(concept.name, tuple(name_prompts(concept, templates)), concept.description,
                                 GROUPS[concept.role]))
    return out


def candidate_classes(manifest: Manifest, extra: list[str]) -> tuple[list[str], list[int]]:
    """Candidate class names (the set's, then extra ones not already there) and the map
    from the set's label index to the candidate index."""
    names = list(manifest.classes)
    seen = {normalize(n) for n in names}
    for name in extra:
        if normalize(name) not in seen:
            names.append(name)
            seen.add(normalize(name))
    return names, list(range(len(manifest.classes)))


@torch.no_grad()
def class_embeddings(model: ImageTextModel, prompts: list[list[str]] | list[tuple[str, ...]]) -> torch.Tensor:
    """(K, D): per class, the renormalized mean of its prompts' embeddings."""
    rows = [F.normalize(model.encode_texts(list(p)).mean(0), dim=-1) for p in prompts]
    return torch.stack(rows)


class ImageList(torch.utils.data.Dataset):
    """Preprocessed pixels of a list of image files (errors name the corrupt file)."""

    def __init__(self, paths: tuple[str, ...], model: ImageTextModel):
        self.paths, self.model = paths, model

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.model.preprocess(open_image(Path(self.paths[i])))


@torch.no_grad()
def embed_images(model: ImageTextModel, paths: tuple[str, ...], batch_size: int, workers: int = 0,
                 progress: bool = True) -> torch.Tensor:
    """(N, D) image embeddings, decoded by `workers` processes (0: in this process)."""
    loader = torch.utils.data.DataLoader(ImageList(paths, model), batch_size=batch_size, num_workers=workers)
    feats = [model.encode_images(pixels).cpu()
             for pixels in tqdm(loader, desc="embed images", disable=not progress, leave=False)]
    return torch.cat(feats)


def score(pred: torch.Tensor, labels: torch.Tensor, candidates: list[Candidate], prefix: str,
          per_class: bool = True) -> dict[str, float]:
    """Flat metrics: overall accuracy, pooled accuracy per group, accuracy per class."""
    out: dict[str, float] = {f"{prefix}_overall_acc": accuracy(pred, labels)}
    for group in ("target", "retention"):
        ids = torch.tensor([k for k, c in enumerate(candidates) if c.group == group], dtype=torch.long)
        mask = torch.isin(labels, ids)
        if mask.any():
            out[f"{prefix}_{group}_acc"] = accuracy(pred[mask], labels[mask])
    for cand, acc in zip(candidates, per_class_accuracy(pred, labels, len(candidates))):
        if acc is not None and (per_class or cand.description is not None):
            out[f"{prefix}_class_{cand.key}_acc"] = acc
    return out


def evaluate(model: ImageTextModel, manifest: Manifest, extra_classes: list[str], concepts: list[ConceptText],
             templates: list[str], params: EvaluateParams, progress: bool = True) -> dict[str, float]:
    """Zero-shot accuracy of one set, with name prompts and (when possible) description prompts."""
    model.module.eval()
    names, label_map = candidate_classes(manifest, extra_classes)
    candidates = build_candidates(names, concepts, templates)
    image_emb = embed_images(model, manifest.paths, params.batch_size, params.workers, progress)  # (N, D)
    labels = torch.tensor([label_map[k] for k in manifest.labels])
    per_class = len(candidates) <= PER_CLASS_LIMIT
    kinds = {"name": [c.prompts for c in candidates]}
    if all(c.description for c in candidates):
        kinds["description"] = [(description_prompt(c.description),) for c in candidates]
    metrics: dict[str, float] = {"n_images": float(len(manifest))}
    for kind, prompts in kinds.items():
        logits = image_emb @ class_embeddings(model, prompts).cpu().T  # (N, K)
        metrics.update(score(logits.argmax(-1), labels, candidates, kind, per_class))
    return metrics
