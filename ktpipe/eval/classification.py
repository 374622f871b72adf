"""Zero-shot classification with prompt-template ensembling.

Each image of a set is classified among the set's classes plus the classes of any sets named
in its `extra_classes` (Table 1 classifies a moongate among the novel concepts and ImageNet's
1000 classes). A class that is one of the experiment's concepts is prompted with its name
and aliases; it counts as *target* when novel, *retention* when known. Every other class
counts as retention. When every candidate is a described concept, the description itself
is also tried as the class prompt (the description-prompt baseline).

A model that embeds images and texts classifies by CLIP's recipe (each class's prompt embeddings
averaged and renormalized); a model that only scores pairs (a cross-encoder) scores every image
against every prompt and averages a class's prompt scores. A model that cuts long texts itself
(ViLT's 40 tokens) gets its name prompts cut to that limit, counted as `texts_truncated`;
description prompts over it stay an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ktpipe import distributed
from ktpipe.concepts import ConceptText
from ktpipe.datasets import Manifest, normalize_class as normalize
from ktpipe.eval.base import TaskInput, pct
from ktpipe.eval.embeddings import EmbeddingCache
from ktpipe.eval.metrics import accuracy, per_class_accuracy
from ktpipe.images import open_image
from ktpipe.prompts import dclip_prompts
from ktpipe.models.base import (CutsTexts, EmbedsImages, EmbedsTexts, PadsImages, ScoresPairs, TakesImages,
                                is_dual_encoder, require)

GROUPS = {"novel": "target", "known": "retention"}
PER_CLASS_LIMIT = 20  # sets with more classes report per-class accuracy for concepts only
# Prompt-only baselines: the model before transfer, no weight changed, each class prompted from its description
PROMPT_ONLY = {"description": "the description as the prompt", "dclip": "DCLIP descriptor prompts"}


@dataclass(frozen=True)
class Candidate:
    key: str  # metric key: the concept name, or the class name made key-safe
    prompts: tuple[str, ...]  # name prompts, ensembled
    description: str | None  # the concept's description (None for plain dataset classes)
    group: str  # target (novel concept) or retention (everything else)
    name: str = ""  # the class's name as prompts write it (a concept's text name)


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


def build_candidates(class_names: list[str], concepts: list[ConceptText], templates: list[str]) -> list[Candidate]:
    """One candidate per class name, prompted through its concept when it is one."""
    by_name = {normalize(n): c for c in concepts for n in (c.name, c.text_name)}
    out = []
    for name in class_names:
        concept = by_name.get(normalize(name))
        if concept is None:
            out.append(Candidate(metric_key(name), tuple(t.format(name) for t in templates), None, "retention", name))
        else:
            out.append(Candidate(concept.name, tuple(name_prompts(concept, templates)), concept.description,
                                 GROUPS[concept.role], concept.text_name))
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
def class_embeddings(model: EmbedsTexts, prompts: list[list[str]] | list[tuple[str, ...]],
                     cache: EmbeddingCache | None = None) -> torch.Tensor:
    """(K, D): per class, the renormalized mean of its prompts' embeddings (through `cache`: each
    class's prompts encoded once per model; without one, once per call)."""
    return (cache or EmbeddingCache()).class_embeddings(model, prompts)


class ImageList(torch.utils.data.Dataset):
    """Preprocessed pixels of a list of image files (errors name the corrupt file)."""

    def __init__(self, paths: tuple[str, ...], model: TakesImages):
        self.paths, self.model = paths, model

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.model.preprocess(open_image(Path(self.paths[i])))


def my_paths(paths: tuple[str, ...], batch_size: int) -> tuple[str, ...]:
    """The images of the batches this process computes: all of them, or over several processes
    every world-th batch (ktpipe.distributed.my_chunks), gathered back with `gather_chunks`."""
    return tuple(paths[i] for chunk in distributed.my_chunks(len(paths), batch_size) for i in chunk)


def image_batches(model: TakesImages, paths: tuple[str, ...], batch_size: int, workers: int = 0,
                  progress: bool = True, desc: str = "images", pin_memory: bool = False):
    """Batches of preprocessed pixels (B, 3, S, S), or PaddedPixels for a model that pads its own
    batches (PadsImages), decoded by `workers` processes (0: in this process), in page-locked
    memory with `pin_memory` (a faster copy to a GPU)."""
    collate = model.collate_images if isinstance(model, PadsImages) else None
    loader = torch.utils.data.DataLoader(ImageList(paths, model), batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate, pin_memory=pin_memory)
    return tqdm(loader, desc=desc, disable=not progress or not distributed.is_main(), leave=False)


@torch.no_grad()
def embed_images(model: EmbedsImages, paths: tuple[str, ...], batch_size: int, workers: int = 0,
                 progress: bool = True, cache: EmbeddingCache | None = None, pin_memory: bool = False) -> torch.Tensor:
    """(N, D) image embeddings (from `cache`'s store when it holds this model's embeddings of them)."""
    def compute() -> torch.Tensor:
        batches = image_batches(model, my_paths(paths, batch_size), batch_size, workers, progress, "embed images",
                                pin_memory)
        return torch.cat(distributed.gather_chunks([model.encode_images(pixels).float().cpu() for pixels in batches]))

    return compute() if cache is None else cache.image_embeddings(model, paths, batch_size, compute)


@torch.no_grad()
def pair_class_scores(model: ScoresPairs, paths: tuple[str, ...], prompts: list[tuple[str, ...]],
                      batch_size: int, workers: int = 0, progress: bool = True,
                      pin_memory: bool = False) -> torch.Tensor:
    """(N, K) scores of every image against every class: the mean of its prompts' pair scores."""
    flat = [p for class_prompts in prompts for p in class_prompts]
    owner = torch.tensor([k for k, class_prompts in enumerate(prompts) for _ in class_prompts])
    counts = torch.bincount(owner, minlength=len(prompts)).float()
    targets, rows = model.text_targets(flat), []
    for pixels in image_batches(model, my_paths(paths, batch_size), batch_size, workers, progress, "score pairs",
                                pin_memory):
        scores = model.score_targets(pixels, targets).float().cpu()  # (B, P)
        rows.append(torch.zeros(len(pixels), len(prompts)).index_add_(1, owner, scores) / counts)
    return torch.cat(distributed.gather_chunks(rows))


def fit_texts(model, texts: list[str]) -> tuple[list[str], dict[str, float]]:
    """Evaluation texts cut to the text limit of a model that cuts texts itself (CutsTexts), and
    `texts_truncated`, how many were cut; other models' texts as they are, and no metric."""
    if not isinstance(model, CutsTexts):
        return list(texts), {}
    fitted = model.fit_texts(list(texts))
    return fitted, {"texts_truncated": float(sum(a != b for a, b in zip(texts, fitted)))}


def fit_prompts(model, prompts: list[tuple[str, ...]]) -> tuple[list[tuple[str, ...]], dict[str, float]]:
    """`fit_texts` over each class's prompts, grouped as given."""
    fitted, cut = fit_texts(model, [p for class_prompts in prompts for p in class_prompts])
    found = iter(fitted)
    return [tuple(next(found) for _ in class_prompts) for class_prompts in prompts], cut


def class_scores(model, paths: tuple[str, ...], kinds: dict[str, list], batch_size: int, workers: int = 0,
                 progress: bool = True, cache: EmbeddingCache | None = None,
                 pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """Prompt kind -> (N, K) class scores of the images: by embeddings when the model has them
    (images embedded once for every prompt kind, class prompts through `cache`), else by pair scores."""
    if is_dual_encoder(model):
        image_emb = embed_images(model, paths, batch_size, workers, progress, cache, pin_memory)
        return {kind: image_emb @ class_embeddings(model, prompts, cache).cpu().T for kind, prompts in kinds.items()}
    require(model, ScoresPairs, "zero-shot classification")
    return {kind: pair_class_scores(model, paths, prompts, batch_size, workers, progress, pin_memory)
            for kind, prompts in kinds.items()}


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


class ZeroShotClassification:
    """Zero-shot classification (the `classification` task): name prompts, and description
    prompts when every candidate is a described concept."""

    name = "classification"
    record_kind = "labeled"

    def evaluate(self, model, data: TaskInput, progress: bool = True) -> dict[str, float]:
        """Accuracy overall, per group (target, retention) and per class, per prompt kind; for a
        model that cuts long texts, how many name prompts it cut (`texts_truncated`)."""
        model.module.eval()
        names, label_map = candidate_classes(data.manifest, data.extra_classes)
        candidates = build_candidates(names, data.concepts, data.templates)
        labels = torch.tensor([label_map[k] for k in data.manifest.labels])
        per_class = len(candidates) <= PER_CLASS_LIMIT
        prompts, cut = fit_prompts(model, [c.prompts for c in candidates])
        kinds = {"name": prompts}
        if all(c.description for c in candidates):
            kinds["description"] = [(description_prompt(c.description),) for c in candidates]
            if is_dual_encoder(model):  # a cross-encoder would score every descriptor of every class with every image
                kinds["dclip"] = [tuple(dclip_prompts(c.name, c.description)) for c in candidates]
        metrics: dict[str, float] = {"n_images": float(len(data.manifest)), **cut}
        scores = class_scores(model, data.manifest.paths, kinds, data.params.batch_size, data.params.workers, progress,
                              data.cache, data.params.pin_memory)
        for kind, logits in scores.items():
            metrics.update(score(logits.argmax(-1), labels, candidates, kind, per_class))
        return metrics

    def summary(self, metrics: dict[str, float], concepts: list[ConceptText]) -> dict[str, float]:
        """Target and retention accuracy (name prompts), the description-prompt target, and each
        novel concept's accuracy."""
        out = {g: metrics[f"name_{g}_acc"] for g in ("target", "retention") if f"name_{g}_acc" in metrics}
        for kind in PROMPT_ONLY:
            if f"{kind}_target_acc" in metrics:
                out[f"{kind}_target"] = metrics[f"{kind}_target_acc"]
        out.update({c.name: metrics[f"name_class_{c.name}_acc"] for c in concepts
                    if c.role == "novel" and f"name_class_{c.name}_acc" in metrics})
        return out

    def report_table(self, results: dict[str, dict[str, float]], concepts: list[ConceptText]) -> list[str]:
        """Per-concept accuracy, then pooled target, retention and overall: the baseline, its
        description prompt (and DCLIP prompts, for a dual encoder), and each recipe after transfer;
        then whether each recipe beats the best prompt-only baseline on the novel concepts."""
        models = list(results)
        baseline = results[models[0]]
        dclip = any(key.startswith("dclip_") for key in baseline)
        cols = ["Baseline", "Description prompt", *(["DCLIP prompts"] if dclip else []),
                *[f"Transfer ({m})" for m in models[1:]]]
        lines = ["| Class | Group | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]

        def row(label: str, group: str, key: str) -> str:
            values = [baseline.get(key.format(kind)) for kind in ("name", "description", *(["dclip"] if dclip else []))]
            values += [results[m].get(key.format("name")) for m in models[1:]]
            return f"| {label} | {group} | " + " | ".join(pct(v) for v in values) + " |"

        for role, group in (("novel", "target"), ("known", "retention")):
            present = [c for c in concepts if c.role == role and f"name_class_{c.name}_acc" in baseline]
            lines += [row(c.name, group, f"{{}}_class_{c.name}_acc") for c in present]
            if f"name_{group}_acc" in baseline:
                lines.append(row(f"**{group} (pooled)**", group, f"{{}}_{group}_acc"))
        lines.append(row("**overall**", "all", "{}_overall_acc"))
        return lines + prompt_only_verdict(results)


def prompt_only_verdict(results: dict[str, dict[str, float]]) -> list[str]:
    """A sentence: the prompt-only baselines' target accuracy, and whether each recipe's transfer
    (name prompts) beats the best of them; nothing when the set has no prompt-only baseline."""
    models = list(results)
    found = {kind: results[models[0]].get(f"{kind}_target_acc") for kind in PROMPT_ONLY}
    found = {kind: value for kind, value in found.items() if value is not None}
    transfer = {m: results[m].get("name_target_acc") for m in models[1:]}
    transfer = {m: value for m, value in transfer.items() if value is not None}
    if not found or not transfer:
        return []
    best = max(found, key=found.get)
    verdicts = [f"`{m}` {pct(v)} ({'beats' if v > found[best] else 'does not beat'} it)" for m, v in transfer.items()]
    return ["", "Prompt-only baselines on the novel concepts (the model before transfer, no weight changed): "
            + ", ".join(f"{PROMPT_ONLY[kind]} {pct(value)}" for kind, value in found.items())
            + f"; the best is {PROMPT_ONLY[best]}. Transfer, name prompts: " + "; ".join(verdicts) + "."]
