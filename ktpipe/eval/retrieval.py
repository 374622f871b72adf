"""Image-text retrieval: Recall@K from text to image and from image to text over images with
several reference captions (the protocol of CLIP_benchmark and of the paper's Tables 5 and 8).

Every image is scored against every distinct caption of the set. A text-to-image query hits at
K when an image it describes is among the K best-scored images; an image-to-text query hits when
one of its captions is among the K best-scored captions. A caption written for several images (the
demo world captions renders by concept and background) is one query whose positives are all of
them; on sets without repeated captions this is the usual protocol.

A model that embeds images and texts scores by cosine similarity (one matrix, batched); a model
that only scores pairs (a cross-encoder) scores every image with every caption (`all_pairs`), or,
when the set has a `rerank` entry, only the K best candidates that a dual encoder proposes for
each query (`rerank`): for a caption its K best images, for an image its K best captions, each
pair scored once. Reranked candidates rank above the rest, which keep the dual encoder's order.
A model that cuts long texts itself (ViLT: 40 tokens) scores the captions cut to its limit, and
`texts_truncated` counts the captions it cut.

Recalls are reported over all queries and, when the set's captions name the experiment's
concepts, over the queries of novel concepts (target) and of known ones (retention): transfer
should lift the first and keep the second.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from ktpipe.concepts import ConceptText
from ktpipe.datasets import Manifest
from ktpipe.eval.base import TaskInput, pct
from ktpipe.eval.embeddings import EmbeddingCache
from ktpipe.eval.classification import embed_images, fit_texts, image_batches, pair_class_scores
from ktpipe.models.base import EmbedsTexts, ScoresPairs, is_dual_encoder, require
from ktpipe.params import ParamsError

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


def concept_pattern(concept: ConceptText) -> re.Pattern:
    """Matches a caption that names the concept as a whole word (name, name with spaces, aliases)."""
    names = [concept.name, concept.text_name, *concept.aliases]
    return re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")\b", re.IGNORECASE)


def concept_groups(captions: list[str], concepts: list[ConceptText]) -> dict[str, torch.Tensor]:
    """'target' and 'retention': (T,) masks of the captions that name a novel or a known concept
    (as a whole word, by name or alias); groups without captions are left out."""
    groups = {"target": torch.zeros(len(captions), dtype=torch.bool),
              "retention": torch.zeros(len(captions), dtype=torch.bool)}
    for concept in concepts:
        pattern = concept_pattern(concept)
        hits = torch.tensor([bool(pattern.search(c)) for c in captions])
        groups["target" if concept.role == "novel" else "retention"] |= hits
    return {group: mask for group, mask in groups.items() if mask.any()}


def retrieval_metrics(scores: torch.Tensor, positives: torch.Tensor, groups: dict[str, torch.Tensor] | None = None,
                      t2i_scores: torch.Tensor | None = None) -> dict[str, float]:
    """Flat Recall@K metrics of an (N images, T captions) score matrix, as fractions of queries:
    `t2i_r<K>` and `i2t_r<K>` over all queries, `<group>_t2i_r<K>` over a group's captions and
    `<group>_i2t_r<K>` over the images those captions describe. `t2i_scores` (N, T), when given,
    ranks images for the captions instead of `scores` (a rerank scores each direction apart)."""
    by_caption = scores if t2i_scores is None else t2i_scores
    hits = {"t2i": lambda k: recall_at_k(by_caption.T, positives.T, k),
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
    return torch.cat([model.encode_texts(texts[i:i + batch_size]).float().cpu()
                      for i in range(0, len(texts), batch_size)])


def score_matrix(model, manifest: Manifest, captions: list[str], batch_size: int, workers: int = 0,
                 progress: bool = True, cache: EmbeddingCache | None = None, pin_memory: bool = False) -> torch.Tensor:
    """(N images, T captions) scores: cosine similarities of a dual encoder (images and captions
    embedded once; the images from `cache`'s store when it holds them), or every pair through a
    cross-encoder (`all_pairs`)."""
    if is_dual_encoder(model):
        return embed_images(model, manifest.paths, batch_size, workers, progress, cache, pin_memory) @ embed_texts(
            model, captions, batch_size).T
    require(model, ScoresPairs, "retrieval")
    return pair_class_scores(model, manifest.paths, [(c,) for c in captions], batch_size, workers, progress,
                             pin_memory)


CANDIDATE_OFFSET = 1.0e6  # lifts a reranked candidate's match logit above every dual-encoder score


@torch.no_grad()
def score_candidates(model: ScoresPairs, manifest: Manifest, captions: list[str], candidates: torch.Tensor,
                     batch_size: int, workers: int = 0, progress: bool = True,
                     pin_memory: bool = False) -> torch.Tensor:
    """(N, T) match scores of the (image, caption) pairs marked in `candidates` (N, T), NaN
    elsewhere: each image decoded once, its pairs scored `batch_size` at a time."""
    scores = torch.full(candidates.shape, float("nan"), dtype=torch.float64)
    start = 0
    for pixels in image_batches(model, manifest.paths, batch_size, workers, progress, "rerank pairs", pin_memory):
        rows, cols = candidates[start:start + len(pixels)].nonzero(as_tuple=True)
        for chunk in range(0, len(rows), batch_size):
            r, c = rows[chunk:chunk + batch_size], cols[chunk:chunk + batch_size]
            found = model.score_pairs(pixels[r], [captions[int(i)] for i in c]).double().cpu()
            scores[r + start, c] = found
        start += len(pixels)
    return scores


def check_rerank_k(k: int, n_images: int, n_captions: int, set_name: str) -> None:
    if not 1 <= k <= min(n_images, n_captions):
        raise ParamsError(f"params key 'evaluate.sets.{set_name}.rerank.k' is {k}, but set {set_name!r} has "
                          f"{n_images} images and {n_captions} distinct captions: k must lie in "
                          f"[1, {min(n_images, n_captions)}]")


def rerank(model: ScoresPairs, proposals: torch.Tensor, manifest: Manifest, captions: list[str], k: int,
           batch_size: int, workers: int = 0, progress: bool = True,
           pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """i2t and t2i ranking keys (N, T) and the number of pairs scored: each caption's `k` best
    images and each image's `k` best captions by the dual encoder's `proposals` (N, T) rescored
    by the cross-encoder, every candidate above every other image or caption."""
    n_images, n_captions = proposals.shape
    by_caption = torch.zeros(n_images, n_captions, dtype=torch.bool)
    by_caption.scatter_(0, proposals.topk(k, dim=0).indices, True)  # each caption's k images
    by_image = torch.zeros(n_images, n_captions, dtype=torch.bool)
    by_image.scatter_(1, proposals.topk(k, dim=1).indices, True)  # each image's k captions
    pairs = by_caption | by_image
    matched = score_candidates(model, manifest, captions, pairs, batch_size, workers, progress, pin_memory)
    base = proposals.double()
    i2t = torch.where(by_image, CANDIDATE_OFFSET + matched, base)
    t2i = torch.where(by_caption, CANDIDATE_OFFSET + matched, base)
    return i2t, t2i, int(pairs.sum())


def load_proposer(spec: Any, set_name: str) -> Any:
    """The dual encoder that proposes a rerank's candidates (`evaluate.sets.<set>.rerank.model`)."""
    from ktpipe.models import load_model  # the backends import only here

    proposer = load_model(spec.backend, spec.name, spec.pretrained, spec.device)
    if not is_dual_encoder(proposer):
        raise ParamsError(f"params key 'evaluate.sets.{set_name}.rerank.model' must name a dual encoder (it "
                          f"proposes candidates by embedding images and texts); {spec.name!r} does not embed both")
    proposer.module.eval()
    return proposer


class Retrieval:
    """Image-text retrieval (the `retrieval` task): Recall@1/5/10 in both directions."""

    name = "retrieval"
    record_kind = "captioned"

    def evaluate(self, model, data: TaskInput, progress: bool = True) -> dict[str, float]:
        """Recall@K overall and per concept group (target, retention); for a cross-encoder also
        the number of pairs it scored (`pairs_scored`), and with `rerank`, its k; for a model that
        cuts long texts, how many captions it cut (`texts_truncated`)."""
        model.module.eval()
        captions, positives = caption_index(data.manifest)
        groups = concept_groups(captions, data.concepts)
        scored, cut = fit_texts(model, captions)  # the captions as the evaluated model reads them
        batch, workers, pin = data.params.batch_size, data.params.workers, data.params.pin_memory
        dual = is_dual_encoder(model)
        if data.spec.rerank is None:
            scores = score_matrix(model, data.manifest, scored, batch, workers, progress, data.cache, pin)
            extra = {} if dual else {"pairs_scored": float(scores.numel())}
            return {**retrieval_metrics(scores, positives, groups), **extra, **cut}
        if dual:
            raise ParamsError(f"params key 'evaluate.sets.{data.set_name}.rerank': rerank rescores candidates "
                              f"with a cross-encoder, but the evaluated model embeds images and texts (a dual "
                              "encoder ranks every pair itself); remove the rerank entry for it")
        require(model, ScoresPairs, "retrieval by rerank")
        check_rerank_k(data.spec.rerank.k, len(data.manifest), len(captions), data.set_name)
        proposer = load_proposer(data.spec.rerank.model, data.set_name)
        proposals = score_matrix(proposer, data.manifest, captions, batch, workers, progress, pin_memory=pin)
        i2t, t2i, passes = rerank(model, proposals, data.manifest, scored, data.spec.rerank.k, batch, workers,
                                  progress, pin)
        return {**retrieval_metrics(i2t, positives, groups, t2i_scores=t2i), "pairs_scored": float(passes),
                "rerank_k": float(data.spec.rerank.k), **cut}

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
        passes = {model: m for model, m in results.items() if "pairs_scored" in m}
        if passes:
            how = ", ".join(f"{model} {int(m['pairs_scored']):,}" + (f" (rerank k={int(m['rerank_k'])})"
                                                                      if "rerank_k" in m else " (all pairs)")
                            for model, m in passes.items())
            lines += ["", f"Image-text pairs the cross-encoder scored: {how}."]
        return lines
