"""Image-text retrieval: Recall@K from text to image and from image to text over images with
several reference captions (the protocol of CLIP_benchmark and of the paper's Tables 5 and 8).

Every image is scored against every distinct caption of the set. A text-to-image query hits at
K when an image it describes is among the K best-scored images; an image-to-text query hits when
one of its captions is among the K best-scored captions. A caption written for several images (the
demo world captions renders by concept and background) is one query whose positives are all of
them; on sets without repeated captions this is the usual protocol.

A model that embeds images and texts scores by cosine similarity (one matrix, batched); a model
that only scores pairs (a cross-encoder) scores every image with every caption (`all_pairs`).

Recalls are reported over all queries and, when the set's captions name the experiment's
concepts, over the queries of novel concepts (target) and of known ones (retention): transfer
should lift the first and keep the second.
"""
from __future__ import annotations

import re

import torch

from ktpipe.concepts import ConceptText
from ktpipe.datasets import Manifest
from ktpipe.eval.base import TaskInput, pct
from ktpipe.eval.classification import embed_images, pair_class_scores
from ktpipe.models.base import EmbedsImages, EmbedsTexts, ScoresPairs, require

RECALL_AT = (1, 5, 10)
DIRECTIONS = {"t2i": "text to image", "i2t": "image to text"}


def caption_index(manifest: Manifest) -> tuple[list[str], torch.Tensor]:
    """The set's distinct captions in first-seen order, and the (N images, T captions) boolean
    matrix of which image each caption describes."""
    captions: dict[str, int] = {}
    pairs = []
    for i, record in enumerate(manifest.records):
        for caption in record.captions:
            pairs.append((i, captions.setdefault(caption, len(captions))))
    positives = torch.zeros(len(manifest), len(captions), dtype=torch.bool)
    rows, cols = zip(*pairs)
    positives[list(rows), list(cols)] = True
    return list(captions), positives


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, k: int) -> torch.Tensor:
    """(Q,) 1.0 where a query's K best-scored candidates include a positive, else 0.0.

    scores and positives are (Q queries, C candidates); K above C counts every candidate.
    """
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return positives.gather(1, top).any(dim=1).float()


def concept_groups(captions: list[str], concepts: list[ConceptText]) -> dict[str, torch.Tensor]:
    """'target' and 'retention': (T,) masks of the captions that name a novel or a known concept
    (as a whole word, by name or alias); groups without captions are left out."""
    groups = {"target": torch.zeros(len(captions), dtype=torch.bool),
              "retention": torch.zeros(len(captions), dtype=torch.bool)}
    for concept in concepts:
        names = [concept.name, concept.text_name, *concept.aliases]
        pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")\b", re.IGNORECASE)
        hits = torch.tensor([bool(pattern.search(c)) for c in captions])
        groups["target" if concept.role == "novel" else "retention"] |= hits
    return {group: mask for group, mask in groups.items() if mask.any()}


def retrieval_metrics(scores: torch.Tensor, positives: torch.Tensor,
                      groups: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Flat Recall@K metrics of an (N images, T captions) score matrix, in percent of queries:
    `t2i_r<K>` and `i2t_r<K>` over all queries, `<group>_t2i_r<K>` over a group's captions and
    `<group>_i2t_r<K>` over the images those captions describe."""
    hits = {"t2i": lambda k: recall_at_k(scores.T, positives.T, k),
            "i2t": lambda k: recall_at_k(scores, positives, k)}
    out: dict[str, float] = {"n_images": float(scores.shape[0]), "n_captions": float(scores.shape[1])}
    for direction, hit in hits.items():
        for k in RECALL_AT:
            found = hit(k)
            out[f"{direction}_r{k}"] = found.mean().item()
            for group, captions in (groups or {}).items():
                queries = captions if direction == "t2i" else positives[:, captions].any(dim=1)
                out[f"{group}_{direction}_r{k}"] = found[queries].mean().item()
    return out


@torch.no_grad()
def embed_texts(model: EmbedsTexts, texts: list[str], batch_size: int) -> torch.Tensor:
    """(T, D) normalized text embeddings, `batch_size` texts per forward pass."""
    return torch.cat([model.encode_texts(texts[i:i + batch_size]).cpu() for i in range(0, len(texts), batch_size)])


def score_matrix(model, manifest: Manifest, captions: list[str], batch_size: int, workers: int = 0,
                 progress: bool = True) -> torch.Tensor:
    """(N images, T captions) scores: cosine similarities of a dual encoder (images and captions
    embedded once), or every pair through a cross-encoder (`all_pairs`)."""
    if isinstance(model, EmbedsImages) and isinstance(model, EmbedsTexts):
        return embed_images(model, manifest.paths, batch_size, workers, progress) @ embed_texts(
            model, captions, batch_size).T
    require(model, ScoresPairs, "retrieval")
    return pair_class_scores(model, manifest.paths, [(c,) for c in captions], batch_size, workers, progress)


class Retrieval:
    """Image-text retrieval (the `retrieval` task): Recall@1/5/10 in both directions."""

    name = "retrieval"
    record_kind = "captioned"

    def evaluate(self, model, data: TaskInput, progress: bool = True) -> dict[str, float]:
        """Recall@K overall and per concept group (target, retention)."""
        model.module.eval()
        captions, positives = caption_index(data.manifest)
        scores = score_matrix(model, data.manifest, captions, data.params.batch_size, data.params.workers, progress)
        return retrieval_metrics(scores, positives, concept_groups(captions, data.concepts))

    def summary(self, metrics: dict[str, float], concepts: list[ConceptText]) -> dict[str, float]:
        """Recall@1 and @5 both ways, overall and for the target group when the set has one."""
        keys = [f"{d}_r{k}" for d in DIRECTIONS for k in (1, 5)]
        out = {key: metrics[key] for key in keys}
        out.update({f"target_{key}": metrics[f"target_{key}"] for key in keys if f"target_{key}" in metrics})
        return out

    def report_table(self, results: dict[str, dict[str, float]], concepts: list[ConceptText]) -> list[str]:
        """Recall@1/5/10 per direction (columns), per model and query group (rows), in the shape
        of the paper's Tables 5 and 8."""
        cols = [f"{label} R@{k}" for label in ("Text->image", "Image->text") for k in RECALL_AT]
        lines = ["| Model | Queries | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for model, metrics in results.items():
            for group, prefix in (("all", ""), ("target", "target_"), ("retention", "retention_")):
                keys = [f"{prefix}{d}_r{k}" for d in DIRECTIONS for k in RECALL_AT]
                if keys[0] in metrics:
                    lines.append(f"| {model} | {group} | " + " | ".join(pct(metrics.get(key)) for key in keys) + " |")
        return lines
