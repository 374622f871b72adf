"""Every task's prediction path on inputs whose answer is known, against a reference written here.

A tiny fake dual encoder (`ColorEncoder`: an image's embedding is its mean RGB, a text's comes
from a table) and a fake cross-encoder drive classification and retrieval through the model
interface (ktpipe.models.base), so a flipped argmax, swapped label map, wrong prompt ensemble,
swapped retrieval direction or off-by-one K changes a number asserted here. Segmentation's
saliency -> mask -> MONAI scores and captioning's score plumbing run on hand-made maps, masks and
captions. Each test names the mutation it guards against.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from ktpipe.concepts import ConceptText
from ktpipe.datasets import CaptionedImage, Manifest, build_manifest
from ktpipe.eval import captioning as cap
from ktpipe.eval.base import TaskInput
from ktpipe.eval.classification import ZeroShotClassification, class_embeddings, pair_class_scores
from ktpipe.eval.retrieval import Retrieval, caption_index, recall_at_k, retrieval_metrics
from ktpipe.eval.masks import image_scores, mean_scores, saliency_to_mask, segmentation_scores
from ktpipe.models.base import CROSS_ENCODER, is_dual_encoder
from ktpipe.params import DatasetParams, EvaluateParams

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's scorers run Java")


# --- fakes ------------------------------------------------------------------------------------


def colors(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, 3) mean RGB."""
    return pixels.mean(dim=(2, 3))


class ColorEncoder:
    """A dual encoder with known embeddings: an image's is its mean RGB, a text's is `table[text]`."""

    image_size = 2
    resize_rule = "none (2x2 test images)"

    def __init__(self, table: dict[str, tuple[float, ...]]):
        self.table = table
        self.module = torch.nn.Linear(1, 1)  # something to call .eval() on

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return TF.to_tensor(image.convert("RGB"))  # (3, 2, 2)

    def encode_images(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb = colors(pixels)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_texts(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        emb = torch.tensor([self.table[t] for t in texts], dtype=torch.float32)
        return F.normalize(emb, dim=-1) if normalize else emb

    def logit_scale(self) -> torch.Tensor:
        return torch.tensor(100.0)


class ColorPairScorer:
    """A cross-encoder with known scores: image-text score = mean RGB . table[text] (no embeddings)."""

    kind = CROSS_ENCODER
    image_size = 2
    resize_rule = "none (2x2 test images)"

    def __init__(self, table: dict[str, tuple[float, ...]]):
        self.table = table
        self.module = torch.nn.Linear(1, 1)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return TF.to_tensor(image.convert("RGB"))

    def text_targets(self, texts: list[str]) -> list[str]:
        return list(texts)

    def score_targets(self, pixels: torch.Tensor, targets: list[str]) -> torch.Tensor:
        return colors(pixels) @ torch.tensor([self.table[t] for t in targets], dtype=torch.float32).T  # (B, T)

    def score_pairs(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return (colors(pixels) * torch.tensor([self.table[t] for t in texts], dtype=torch.float32)).sum(-1)


def write_image(folder: Path, name: str, rgb: tuple[int, int, int]) -> str:
    """A 2x2 image of one color; 8-bit values like 153 and 204 are exactly 0.6 and 0.8."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    Image.new("RGB", (2, 2), rgb).save(path)
    return str(path)


def unit(v) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def labeled_input(manifest: Manifest, templates: list[str], extra: list[str] = (),
                  concepts: list[ConceptText] = ()) -> TaskInput:
    return TaskInput(manifest.name, manifest, DatasetParams(), list(concepts), list(templates), list(extra),
                     EvaluateParams(batch_size=2))


def test_fakes_have_the_capabilities_the_tasks_ask_for():
    assert is_dual_encoder(ColorEncoder({}))
    assert not is_dual_encoder(ColorPairScorer({}))


# --- classification ---------------------------------------------------------------------------

PRIMARY = {"a red.": (1, 0, 0), "a green.": (0, 1, 0), "a blue.": (0, 0, 1)}


def reference_predictions(image_rgbs, class_vectors) -> list[int]:
    """The class whose vector has the highest cosine with each image's color."""
    return [max(range(len(class_vectors)), key=lambda k: dot(unit(rgb), unit(class_vectors[k])))
            for rgb in image_rgbs]


def test_classification_predicts_the_best_scored_class_and_maps_extra_classes(tmp_path):
    """Guards argmax (argmin), the label map (set classes first, extra ones after, a duplicate
    extra class dropped) and the class index -> metric-key naming."""
    rgbs = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 51, 0), (0, 255, 0)]
    labels = [0, 1, 0, 1, 1]  # red, green, red (but blue: an extra class), green (but reddish), green
    paths = [write_image(tmp_path, f"i{i}", rgb) for i, rgb in enumerate(rgbs)]
    manifest = build_manifest("colors", ["red", "green"], list(zip(paths, labels)))
    data = labeled_input(manifest, ["a {}."], extra=["blue", "Red"])  # 'Red' is the set's 'red' again
    metrics = ZeroShotClassification().evaluate(ColorEncoder(PRIMARY), data, progress=False)

    predicted = reference_predictions(rgbs, [(1, 0, 0), (0, 1, 0), (0, 0, 1)])
    assert predicted == [0, 1, 2, 0, 1]  # candidates: red, green, then the extra blue
    assert metrics == {
        "n_images": 5.0,
        "name_overall_acc": pytest.approx(3 / 5),
        "name_retention_acc": pytest.approx(3 / 5),  # no concepts: every class is retention
        "name_class_red_acc": pytest.approx(1 / 2),  # the blue image labelled red counts as wrong
        "name_class_green_acc": pytest.approx(2 / 3),
    }


def test_classification_groups_concepts_into_target_and_retention(tmp_path):
    """Guards the group pooling: a novel concept's images are target, a known one's retention."""
    rgbs = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (0, 255, 0)]
    labels = [0, 0, 1, 1]  # blicket (red; the blue one is misread), lantern (green)
    paths = [write_image(tmp_path, f"i{i}", rgb) for i, rgb in enumerate(rgbs)]
    concepts = [ConceptText("blicket", "a red ring", role="novel"), ConceptText("lantern", "a green hex", role="known")]
    manifest = build_manifest("colors", ["blicket", "lantern"], list(zip(paths, labels)))
    table = {"a blicket.": (1, 0, 0), "a lantern.": (0, 1, 0), "a blue.": (0, 0, 1),
             "a red ring.": (1, 0, 0), "a green hex.": (0.2, 1, 0)}
    data = labeled_input(manifest, ["a {}."], extra=["blue"], concepts=concepts)
    metrics = ZeroShotClassification().evaluate(ColorEncoder(table), data, progress=False)
    assert metrics["name_target_acc"] == pytest.approx(0.5) and metrics["name_retention_acc"] == 1.0
    assert metrics["name_class_blicket_acc"] == pytest.approx(0.5) and metrics["name_class_lantern_acc"] == 1.0
    assert "description_target_acc" not in metrics  # 'blue' has no description: no description prompts


# Prompt ensembling: class alpha's two prompt embeddings are 10 * e1 and e2, class beta's point at
# (0.2, 0.98, 0). An image of color (0.6, 0.8, 0) is alpha by CLIP's recipe (normalize each prompt,
# average, renormalize: cosine 0.99 against beta's 0.90) but beta when the raw embeddings are
# averaged (alpha ~ e1: 0.68) or when prompt cosines are averaged without renormalizing (0.70).
ENSEMBLE = {"a alpha.": (10, 0, 0), "the alpha.": (0, 1, 0), "a beta.": (0.2, 0.98, 0), "the beta.": (0.6, 2.94, 0)}
ENSEMBLE_TEMPLATES = ["a {}.", "the {}."]


def clip_class_embedding(vectors) -> list[float]:
    """CLIP's zero-shot classifier weight: each prompt normalized, averaged, renormalized."""
    normalized = [unit(v) for v in vectors]
    return unit([sum(v[d] for v in normalized) / len(normalized) for d in range(len(vectors[0]))])


def test_class_embeddings_normalize_each_prompt_then_average_and_renormalize():
    model = ColorEncoder(ENSEMBLE)
    got = class_embeddings(model, [("a alpha.", "the alpha."), ("a beta.", "the beta.")])
    expected = [clip_class_embedding([ENSEMBLE["a alpha."], ENSEMBLE["the alpha."]]),
                clip_class_embedding([ENSEMBLE["a beta."], ENSEMBLE["the beta."]])]
    torch.testing.assert_close(got, torch.tensor(expected))


def test_classification_ensembles_prompts_as_clip_does(tmp_path):
    """Guards normalize-then-average-then-renormalize: raw averaging or averaged cosines misread image 0."""
    rgbs = [(153, 204, 0), (26, 255, 0)]
    paths = [write_image(tmp_path, f"i{i}", rgb) for i, rgb in enumerate(rgbs)]
    manifest = build_manifest("ensemble", ["alpha", "beta"], [(paths[0], 0), (paths[1], 1)])
    metrics = ZeroShotClassification().evaluate(ColorEncoder(ENSEMBLE), labeled_input(manifest, ENSEMBLE_TEMPLATES),
                                                progress=False)
    alpha = clip_class_embedding([ENSEMBLE["a alpha."], ENSEMBLE["the alpha."]])
    beta = clip_class_embedding([ENSEMBLE["a beta."], ENSEMBLE["the beta."]])
    assert reference_predictions(rgbs, [alpha, beta]) == [0, 1]
    raw_alpha = [5, 0.5, 0]  # the raw mean, for contrast: it would call image 0 beta
    assert reference_predictions(rgbs, [raw_alpha, beta]) == [1, 1]
    assert metrics["name_overall_acc"] == 1.0
    assert metrics["name_class_alpha_acc"] == 1.0 and metrics["name_class_beta_acc"] == 1.0


def test_cross_encoder_class_score_is_the_mean_of_its_prompt_scores(tmp_path):
    """Guards the per-class mean of pair scores (a sum would favour the class with more prompts)."""
    table = {"p1": (1, 0, 0), "p2": (5, 0, 0), "q1": (4, 0, 0), "r1": (0, 2, 0), "r2": (0, 0, 3), "r3": (1, 1, 1)}
    paths = (write_image(tmp_path, "red", (255, 0, 0)), write_image(tmp_path, "blue", (0, 0, 255)))
    prompts = [("p1", "p2"), ("q1",), ("r1", "r2", "r3")]
    got = pair_class_scores(ColorPairScorer(table), paths, prompts, batch_size=1, progress=False)
    # reference: per image and class, the mean over the class's prompts of color . table[prompt]
    expected = [[sum(dot(rgb, table[p]) for p in ps) / len(ps) for ps in prompts] for rgb in [(1, 0, 0), (0, 0, 1)]]
    torch.testing.assert_close(got, torch.tensor(expected))
    assert got.argmax(-1).tolist() == [1, 2]  # red: q (4) beats p (mean 3, sum 6)


def test_cross_encoder_classification_runs_the_same_argmax(tmp_path):
    rgbs = [(255, 0, 0), (0, 255, 0), (255, 51, 0)]
    paths = [write_image(tmp_path, f"i{i}", rgb) for i, rgb in enumerate(rgbs)]
    manifest = build_manifest("colors", ["red", "green"], list(zip(paths, [0, 1, 1])))
    metrics = ZeroShotClassification().evaluate(ColorPairScorer(PRIMARY), labeled_input(manifest, ["a {}."]),
                                                progress=False)
    assert metrics["name_overall_acc"] == pytest.approx(2 / 3)
    assert metrics["name_class_red_acc"] == 1.0 and metrics["name_class_green_acc"] == pytest.approx(0.5)


# --- retrieval --------------------------------------------------------------------------------


def reference_recall(scores: list[list[float]], positives: list[list[bool]], k: int) -> list[float]:
    """Per query (row): 1.0 when a positive is among the k highest-scored candidates."""
    out = []
    for row, pos in zip(scores, positives):
        best = sorted(range(len(row)), key=lambda c: -row[c])[:k]
        out.append(float(any(pos[c] for c in best)))
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 7, 20])
def test_recall_at_k_matches_brute_force(k):
    generator = torch.Generator().manual_seed(k)
    scores = torch.randn(9, 12, generator=generator)
    positives = torch.rand(9, 12, generator=generator) < 0.15
    positives[0] = False  # a query without any positive never hits
    got = recall_at_k(scores, positives, k)
    assert got.tolist() == reference_recall(scores.tolist(), positives.tolist(), k)


def test_recall_at_k_counts_the_kth_candidate_but_not_the_next():
    """Image i's caption is its (i+1)-th best: Recall@K is exactly K of 12 queries."""
    n = 12
    scores = torch.empty(n, n)
    for i in range(n):
        others = [c for c in range(n) if c != i]
        order = others[:i] + [i] + others[i:]  # caption i at rank i + 1
        scores[i, order] = torch.arange(n, 0, -1, dtype=torch.float32)
    positives = torch.eye(n, dtype=torch.bool)
    for k in (1, 5, 10):
        assert recall_at_k(scores, positives, k).tolist() == [1.0] * k + [0.0] * (n - k)


def test_retrieval_metrics_rank_each_direction_by_its_own_axis():
    """12 images x 12 captions with different ranks per direction: swapping t2i and i2t (or
    transposing one) changes every figure."""
    generator = torch.Generator().manual_seed(3)  # a seed where each direction's R@1, R@5, R@10 differ
    scores = torch.randn(12, 12, generator=generator)
    positives = torch.eye(12, dtype=torch.bool)
    positives[3, 5] = True  # caption 5 describes images 3 and 5
    got = retrieval_metrics(scores, positives)
    for k in (1, 5, 10):
        i2t = reference_recall(scores.tolist(), positives.tolist(), k)
        t2i = reference_recall(scores.T.tolist(), positives.T.tolist(), k)
        assert got[f"i2t_r{k}"] == pytest.approx(sum(i2t) / 12)
        assert got[f"t2i_r{k}"] == pytest.approx(sum(t2i) / 12)
    assert [got[f"i2t_r{k}"] for k in (1, 5, 10)] == pytest.approx([1 / 12, 4 / 12, 10 / 12])
    assert [got[f"t2i_r{k}"] for k in (1, 5, 10)] == pytest.approx([2 / 12, 3 / 12, 9 / 12])
    assert got["n_images"] == 12 and got["n_captions"] == 12


def test_retrieval_metrics_use_t2i_scores_for_text_queries_only():
    """A rerank ranks images for captions by `t2i_scores` and captions for images by `scores`."""
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2]])  # i2t: image 0 -> c0 (hit), image 1 -> c0 (miss)
    positives = torch.eye(2, dtype=torch.bool)
    plain = retrieval_metrics(scores, positives)
    assert plain["i2t_r1"] == 0.5 and plain["t2i_r1"] == 1.0  # c0 -> image 0, c1 -> image 1
    t2i = torch.tensor([[0.1, 0.9], [0.9, 0.1]])  # c0 -> image 1, c1 -> image 0: both miss
    reranked = retrieval_metrics(scores, positives, t2i_scores=t2i)
    assert reranked["i2t_r1"] == 0.5 and reranked["t2i_r1"] == 0.0


# Three images, four captions (image 0 has two). Cosines (images x captions):
#   img0 (1, 0, 0):     c0 1.00  c1 0.00  c2 0.60  c3 0.10
#   img1 (0.6, 0.8, 0): c0 0.60  c1 0.80  c2 1.00  c3 0.06
#   img2 (0, 1, 0):     c0 0.00  c1 1.00  c2 0.80  c3 0.00
# i2t R@1: only img0 finds its caption (1/3). t2i R@1: c0 and c3 find img0, c1 and c2 miss (2/4).
RETRIEVAL_TABLE = {"a red blicket": (1, 0, 0), "a lime wug": (0, 1, 0), "a green thing": (0.6, 0.8, 0),
                   "a blue blicket": (0.1, 0, 0.995)}


def test_retrieval_task_end_to_end_both_directions_and_groups(tmp_path):
    records = (CaptionedImage(write_image(tmp_path, "red", (255, 0, 0)), ("a red blicket", "a blue blicket")),
               CaptionedImage(write_image(tmp_path, "lime", (153, 204, 0)), ("a lime wug",)),
               CaptionedImage(write_image(tmp_path, "green", (0, 255, 0)), ("a green thing",)))
    manifest = Manifest("pairs", (), records)
    captions, positives = caption_index(manifest)
    assert captions == ["a red blicket", "a blue blicket", "a lime wug", "a green thing"]
    concepts = [ConceptText("blicket", "a ring", role="novel"), ConceptText("wug", "a moon", role="known")]
    data = TaskInput("pairs", manifest, DatasetParams(task="retrieval", format="captions"), concepts, [], [],
                     EvaluateParams(batch_size=2))
    got = Retrieval().evaluate(ColorEncoder(RETRIEVAL_TABLE), data, progress=False)
    assert got["i2t_r1"] == pytest.approx(1 / 3) and got["t2i_r1"] == pytest.approx(2 / 4)
    for k in (5, 10):  # K above the candidates: every query hits
        assert got[f"i2t_r{k}"] == 1.0 and got[f"t2i_r{k}"] == 1.0
    assert got["target_t2i_r1"] == 1.0 and got["target_i2t_r1"] == 1.0  # blicket captions, and image 0
    assert got["retention_t2i_r1"] == 0.0 and got["retention_i2t_r1"] == 0.0  # 'a lime wug', and image 1
    assert got["n_images"] == 3 and got["n_captions"] == 4 and "pairs_scored" not in got


def test_retrieval_task_with_a_cross_encoder_scores_every_pair(tmp_path):
    records = (CaptionedImage(write_image(tmp_path, "red", (255, 0, 0)), ("a red blicket", "a blue blicket")),
               CaptionedImage(write_image(tmp_path, "lime", (153, 204, 0)), ("a lime wug",)),
               CaptionedImage(write_image(tmp_path, "green", (0, 255, 0)), ("a green thing",)))
    data = TaskInput("pairs", Manifest("pairs", (), records), DatasetParams(task="retrieval", format="captions"),
                     [], [], [], EvaluateParams(batch_size=2))
    got = Retrieval().evaluate(ColorPairScorer(RETRIEVAL_TABLE), data, progress=False)
    # the scores are the unnormalized dot products; with these vectors the rankings are the cosines'
    assert got["i2t_r1"] == pytest.approx(1 / 3) and got["t2i_r1"] == pytest.approx(2 / 4)
    assert got["pairs_scored"] == 12.0


# --- segmentation: saliency -> mask -> MONAI scores ----------------------------------------------


def blob_saliency() -> np.ndarray:
    """8x8: background 0.1, a 2x3 block of 0.9 (rows 1-2, cols 1-3), a lone 0.8 pixel at (6, 6)."""
    saliency = np.full((8, 8), 0.1)
    saliency[1:3, 1:4] = 0.9
    saliency[6, 6] = 0.8
    return saliency


@pytest.mark.parametrize("method", ["threshold", "otsu", "kmeans"])
def test_saliency_to_mask_keeps_the_bright_regions_largest_first(method):
    """Guards the threshold direction (foreground above it) and the component filter."""
    block = np.zeros((8, 8), dtype=bool)
    block[1:3, 1:4] = True
    both = block.copy()
    both[6, 6] = True
    assert np.array_equal(saliency_to_mask(blob_saliency(), method, 0.5, components=1), block)
    assert np.array_equal(saliency_to_mask(blob_saliency(), method, 0.5, components=2), both)


def test_threshold_is_relative_to_the_scaled_map():
    # scaled: background 0, block 1, lone pixel 0.875: 0.9 keeps only the block, 0.85 both
    assert saliency_to_mask(blob_saliency(), "threshold", 0.9, components=2).sum() == 6
    assert saliency_to_mask(blob_saliency(), "threshold", 0.85, components=2).sum() == 7
    assert not saliency_to_mask(np.full((4, 4), 0.3), "threshold", 0.5).any()  # a constant map: no foreground


def reference_dsc_iou(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    both = int((predicted & truth).sum())
    return 2 * both / int(predicted.sum() + truth.sum()), both / int((predicted | truth).sum())


def test_segmentation_scores_are_the_known_dsc_and_iou_per_image_in_order():
    """Guards the MONAI plumbing: one score per image in input order, DSC and IoU in their own
    keys, NaN where there is nothing to score (left out of the means)."""
    predicted = saliency_to_mask(blob_saliency(), "threshold", 0.5)  # the 2x3 block
    truth = np.zeros((8, 8), dtype=bool)
    truth[1:3, 1:5] = True  # 2x4: 6 pixels shared
    far = np.zeros((8, 8), dtype=bool)
    far[5:8, 5:8] = True  # disjoint from the block
    nothing = np.zeros_like(far)  # third image: empty truth, empty prediction (no score)
    scores = segmentation_scores(np.stack([predicted, predicted, nothing]), np.stack([truth, far, nothing]))
    dsc, iou = reference_dsc_iou(predicted, truth)
    assert (dsc, iou) == (pytest.approx(12 / 14), pytest.approx(6 / 8))
    assert scores["dsc"][:2] == pytest.approx([dsc, 0.0]) and scores["iou"][:2] == pytest.approx([iou, 0.0])
    assert all(math.isnan(scores[m][2]) for m in ("dsc", "iou", "nsd"))
    assert scores["nsd"][0] > scores["nsd"][1]
    one = image_scores(predicted, truth)
    assert one["dsc"] == pytest.approx(dsc) and one["iou"] == pytest.approx(iou)
    means = mean_scores(scores)
    assert means["dsc"] == pytest.approx(dsc / 2) and means["n_dsc"] == 2  # the empty truth left out


def test_segmentation_scores_an_empty_prediction_on_a_real_object_zero():
    empty, block = np.zeros((4, 4), dtype=bool), np.ones((4, 4), dtype=bool)
    found = image_scores(empty, block)
    assert found["dsc"] == 0.0 and found["iou"] == 0.0  # nothing predicted on a real object


# --- captioning: score plumbing -------------------------------------------------------------------

CAPTION_REFERENCES = [["a red ring on a wooden table"], ["two green dogs play in the park"],
                      ["a blue car parked near the old house"]]


@pytest.fixture(scope="module")
def meteor():
    if shutil.which("java") is None:
        pytest.skip("pycocoevalcap's METEOR runs Java")
    with cap.meteor_scorer() as scorer:
        yield scorer


@needs_java
def test_per_image_caption_scores_follow_each_image(meteor):
    """Image 1's caption is exact, image 2's half right, image 0's unrelated: per-image BLEU-4,
    CIDEr and METEOR must rank them 1 > 2 > 0, i.e. line up with the image ids."""
    references = [*CAPTION_REFERENCES, ["a small cat sleeps on the sofa"]]
    captions = ["zebra xylophone quietly", CAPTION_REFERENCES[1][0], "a blue car near a new shop",
                "sofa the on sleeps cat small a"]  # image 3: every word right, no 2-gram in order
    found, per_image, _ = cap.score_captions(references, captions, {"target": [1], "retention": [0, 2]},
                                             False, meteor)
    for name in ("cider", "meteor", "rouge_l"):
        assert per_image[name][1] > per_image[name][2] > per_image[name][0], name
    assert per_image["bleu4"][1] == pytest.approx(1.0, abs=1e-6) and per_image["bleu4"][0] < 1e-6
    assert per_image["bleu4"][3] < 1e-3 < found["bleu1"]  # BLEU-4 per image, not BLEU-1 (1.0 for image 3)
    assert per_image["cider"][0] == 0.0
    assert found["target_cider"] == pytest.approx(per_image["cider"][1])
    assert found["retention_cider"] == pytest.approx((per_image["cider"][0] + per_image["cider"][2]) / 2)
    assert found["target_bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert found["cider"] == pytest.approx(sum(per_image["cider"]) / 4)
    assert found["target_n_images"] == 1.0 and found["retention_n_images"] == 2.0


class ColorCaptioner(ColorEncoder):
    """Captions an image by its dominant channel."""

    WORDS = ("a red ring on a wooden table", "two green dogs play in the park", "a blue car")

    def generate_captions(self, pixels: torch.Tensor, **settings) -> list[str]:
        return [self.WORDS[int(i)] for i in colors(pixels).argmax(-1)]


@needs_java
def test_captioning_rows_line_up_with_their_images(tmp_path, meteor, monkeypatch):
    """The task end to end: each JSON line's path, caption and scores belong to the same image."""
    import contextlib
    monkeypatch.setattr(cap, "meteor_scorer", lambda: contextlib.nullcontext(meteor))
    rgbs = [(0, 0, 255), (255, 0, 0), (0, 255, 0)]  # blue, red, green: a permutation of the references
    records = tuple(CaptionedImage(write_image(tmp_path / "images", f"i{i}", rgb), tuple(refs))
                    for i, (rgb, refs) in enumerate(zip(rgbs, [CAPTION_REFERENCES[2], CAPTION_REFERENCES[0],
                                                               CAPTION_REFERENCES[1]])))
    manifest = Manifest("caps", (), records)
    concepts = [ConceptText("car", "a vehicle", role="novel")]
    data = TaskInput("caps", manifest, DatasetParams(task="captioning", format="captions"), concepts, [], [],
                     EvaluateParams(batch_size=2, spice=False), tmp_path / "out")
    (tmp_path / "out").mkdir()
    result = cap.Captioning().evaluate(ColorCaptioner({}), data, progress=False)
    rows = cap.read_rows(tmp_path / "out" / cap.CAPTIONS_FILE.format("caps"))
    assert [r["path"] for r in rows] == [r.path for r in records]
    assert [r["caption"] for r in rows] == ["a blue car", CAPTION_REFERENCES[0][0], CAPTION_REFERENCES[1][0]]
    assert rows[1]["bleu4"] == pytest.approx(1.0, abs=1e-6) and rows[2]["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert rows[0]["cider"] < rows[1]["cider"] and rows[0]["bleu4"] < 0.5
    assert rows[0]["group"] == "target" and rows[0]["concepts"] == ["car"] and rows[1]["group"] is None
    assert result.metrics["target_n_images"] == 1.0 and result.metrics["concept_car_n_images"] == 1.0
    assert result.metrics["target_cider"] == pytest.approx(rows[0]["cider"])
    assert result.metrics["cider"] == pytest.approx(sum(r["cider"] for r in rows) / 3)
