"""Fine-tuning objectives, picked by name from `FINETUNE_LOSSES` (params `finetune.loss`).

An objective asks the model for scores or embeddings through its capabilities (ktpipe.models.base)
and names the capabilities it needs, so fine-tuning takes any model family that has them: Eq. 2
and image-text matching need only match scores (a cross-encoder's too); the authors' InfoNCE and
distillation need image embeddings; masked language modelling needs a model that predicts masked
words from an image and a text (ViLT); CoCa's InfoNCE plus captioning loss needs a captioner. The loss arithmetic is in small pure functions,
unit-tested on tiny tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ktpipe.models.base import EmbedsImages, LearnsCaptions, PredictsMaskedWords, ScoresPairs

AUTHORS_BASE_TEMPERATURE = 0.07  # the authors' loss is scaled by temperature / 0.07 (1 at their default)


def eq2_loss(scores: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """Paper Eq. 2: each image against its own caption, the recipe's other captions as negatives.

    scores (B, K) are the images' cosine similarities (or match scores) to the K captions; targets
    (B,) index the caption of each image. With one caption the logits are (B, 1) and the loss is
    identically 0, so `finetune` refuses a one-caption recipe with this loss before training.
    """
    return F.cross_entropy(scores / temperature, targets)


def authors_infonce(image_emb: torch.Tensor, caption_emb: torch.Tensor,
                    temperature: torch.Tensor | float) -> torch.Tensor:
    """The InfoNCE of the authors' public fine-tuning code (`infonce` in
    MedCLIP-SAMv2 transfer/biomedclip_finetune.py), written from its definition.

    The 2B anchors are the batch's images (B, D) and each image's own caption embedding (B, D),
    repeated for images of one concept. Anchor i's positive is its pair (image i <-> caption row i);
    every other anchor but itself is in the denominator, so images also repel each other and a
    single concept still gets a gradient. The mean of -log p(positive) is scaled by temperature / 0.07.
    """
    features = torch.cat([image_emb, caption_emb])  # (2B, D)
    b = image_emb.shape[0]
    logits = features @ features.T / temperature  # (2B, 2B)
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    partner = torch.arange(2 * b, device=logits.device).roll(b)  # i <-> i + B
    return (temperature / AUTHORS_BASE_TEMPERATURE) * F.cross_entropy(logits, partner)


def distillation_loss(image_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """MSE between the fine-tuned and the frozen base model's normalized image embeddings (B, D),
    as the authors' `kd_weight` term."""
    return F.mse_loss(image_emb, teacher_emb)


def itm_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Image-text matching: each image's own caption pushed to "match", every other caption to
    "no match", the two halves weighted equally (ViLT pretrains on as many matches as mismatches).

    scores (B, K) are match logits of every image with every caption; targets (B,) index the
    positives. Binary cross-entropy on the one match logit is the two-way head's cross-entropy.
    """
    positive = F.one_hot(targets, scores.shape[1]).bool()
    match = F.binary_cross_entropy_with_logits(scores[positive], torch.ones_like(scores[positive]))
    mismatch = F.binary_cross_entropy_with_logits(scores[~positive], torch.zeros_like(scores[~positive]))
    return 0.5 * (match + mismatch)


@dataclass(frozen=True)
class Objective:
    """A fine-tuning loss: `loss(model, pixels, text_targets, labels, temperature)` and the model
    capabilities it uses. `text_targets` come from `model.text_targets(texts)`, or from `targets`
    (made once per run) when set; labels (B,) index the recipe's captions, the first of `texts`
    (negative-only captions follow them when `negatives` is set)."""

    loss: Callable[[Any, torch.Tensor, Any, torch.Tensor, Any], torch.Tensor]
    needs: tuple[type, ...]
    uses_temperature: bool = True  # scales cosine similarities (a match logit or a word loss has no temperature)
    negatives: bool = False  # also scores the experiment's other concepts' captions as mismatches
    targets: Callable[..., Any] | None = None  # (model, captions, seed, names=, cfg=) -> targets for the run


def eq2_objective(model: ScoresPairs, pixels: torch.Tensor, text_targets: Any, labels: torch.Tensor,
                  temperature: torch.Tensor | float) -> torch.Tensor:
    """Eq. 2 on the model's (B, K) scores of the batch against every caption of the recipe."""
    scores = model.score_targets(pixels, text_targets)
    return eq2_loss(scores, labels.to(scores.device), temperature)


def authors_objective(model: EmbedsImages, pixels: torch.Tensor, text_targets: torch.Tensor, labels: torch.Tensor,
                      temperature: torch.Tensor | float) -> torch.Tensor:
    """The authors' InfoNCE on the batch's image embeddings and their captions' embeddings."""
    image_emb = model.encode_images(pixels)
    return authors_infonce(image_emb, text_targets[labels.to(image_emb.device)], temperature)


def itm_objective(model: ScoresPairs, pixels: torch.Tensor, text_targets: Any, labels: torch.Tensor,
                  temperature: Any = None) -> torch.Tensor:
    """Image-text matching on the match logits of the batch against every caption (the recipe's
    and the negative-only ones)."""
    scores = model.score_targets(pixels, text_targets)
    return itm_loss(scores, labels.to(scores.device))


@dataclass(frozen=True)
class WordMasking:
    """The recipe's captions and the model's seeded whole-word masker, made once per run so that
    every step masks the captions afresh."""

    captions: list[str]
    masker: Callable[[list[str]], Any]


def word_masking(model: PredictsMaskedWords, captions: list[str], seed: int, **_: Any) -> WordMasking:
    return WordMasking(list(captions), model.word_masker(seed))


def mlm_objective(model: PredictsMaskedWords, pixels: torch.Tensor, targets: WordMasking, labels: torch.Tensor,
                  temperature: Any = None) -> torch.Tensor:
    """Masked language modelling (paper Sec. 8.9): each image's caption with whole words masked,
    the masked words predicted from the image and the rest of the caption."""
    texts = [targets.captions[int(k)] for k in labels]
    return model.masked_word_loss(pixels, targets.masker(texts))


@dataclass(frozen=True)
class CaptionTargets:
    """What CoCa fine-tuning draws from every step: each label's concept caption (the contrastive
    text) and name, the target-caption templates, the seeded generator that picks one template per
    sample and step, and open_clip's CoCaLoss with both weights set."""

    captions: list[str]
    names: list[str]
    templates: list[str]
    generator: torch.Generator
    loss: torch.nn.Module

    def draw(self, labels: torch.Tensor) -> list[str]:
        """One target caption per label: a template drawn at random, filled with the concept's name."""
        picks = torch.randint(len(self.templates), (len(labels),), generator=self.generator).tolist()
        return [self.templates[t].format(self.names[int(k)]) for t, k in zip(picks, labels)]


def caption_targets(model: LearnsCaptions, captions: list[str], seed: int, names: list[str] | None = None,
                    cfg: Any = None) -> CaptionTargets:
    """The run's CaptionTargets (`cfg.target_captions` templates, lambda1 and lambda2 from `cfg`)."""
    import open_clip

    from ktpipe.templates import load_templates

    if names is None:
        raise ValueError("the coca objective needs the concepts' names (finetune names=)")
    loss = open_clip.CoCaLoss(caption_loss_weight=cfg.caption_weight, clip_loss_weight=cfg.contrastive_weight,
                              pad_id=model.pad_id)
    return CaptionTargets(list(captions), list(names), load_templates(cfg.target_captions),
                          torch.Generator().manual_seed(seed), loss)


def coca_loss(contrastive: torch.Tensor, captioning: torch.Tensor) -> torch.Tensor:
    """Paper Sec. 8.8: L = lambda1 InfoNCE + lambda2 L_cap, the two terms as open_clip's CoCaLoss
    returns them (each already multiplied by its weight)."""
    return contrastive + captioning


def coca_objective(model: LearnsCaptions, pixels: torch.Tensor, targets: CaptionTargets, labels: torch.Tensor,
                   temperature: Any = None) -> torch.Tensor:
    """CoCa transfer: InfoNCE of the batch's images against their concept captions, plus the
    captioning loss of a target caption drawn for each image (paper Sec. 8.8). At lambda2 = 0 (Table
    9's rows without the captioning loss) the decoder is not run: InfoNCE alone, as CoCaLoss's."""
    import open_clip

    texts = [targets.captions[int(k)] for k in labels]
    if not targets.loss.caption_loss_weight:
        contrastive = open_clip.ClipLoss.forward(targets.loss, model.encode_images(pixels), model.encode_texts(texts),
                                                 model.logit_scale())
        return targets.loss.clip_loss_weight * contrastive
    inputs = model.caption_loss_inputs(pixels, texts, targets.draw(labels))
    return coca_loss(*targets.loss(**inputs))


FINETUNE_LOSSES: dict[str, Objective] = {
    "eq2": Objective(eq2_objective, (ScoresPairs,)),
    "authors": Objective(authors_objective, (ScoresPairs, EmbedsImages)),
    "itm": Objective(itm_objective, (ScoresPairs,), uses_temperature=False, negatives=True),
    "mlm": Objective(mlm_objective, (PredictsMaskedWords,), uses_temperature=False, targets=word_masking),
    "coca": Objective(coca_objective, (LearnsCaptions,), uses_temperature=False, targets=caption_targets),
}
