"""Knowledge transfer into a cross-encoder, on a tiny random-init ViLT written offline: the image-
text matching loss, ITM and masked-language-modelling fine-tuning (they learn, and move only the
parameters the recipe trains), ViLT's inversion start, retrieval by rerank against a brute-force
reference and against all pairs, and the errors for inputs that cannot work."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from archs import write_vilt
from ktpipe.datasets import CaptionedImage, Manifest
from ktpipe.errors import KtpipeError
from ktpipe.eval import TASKS
from ktpipe.eval.base import TaskInput
from ktpipe.eval.retrieval import caption_index
from ktpipe.transfer.finetune import finetune
from ktpipe.images import initial_pixels
from ktpipe.transfer.losses import itm_loss
from ktpipe.models import ModelLoadError, PredictsMaskedWords, load_model
from ktpipe.params import DatasetParams, EvaluateParams, FinetuneParams, ModelParams, ParamsError, RerankParams

CAPTIONS = ["A heart is a red ring.", "A lung is a blue square.", "A tumor is a green dot."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_vilt(tmp_path_factory.mktemp("vilt") / "itm-mlm", head="itm", mlm=True)


def vilt(folder: Path):
    return load_model("vilt", f"local-dir:{folder}", device="cpu")


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_itm_loss_weighs_matches_and_mismatches_equally():
    scores = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([0, 1])
    match = F.binary_cross_entropy_with_logits(torch.tensor([2.0, 3.0]), torch.ones(2))
    mismatch = F.binary_cross_entropy_with_logits(torch.tensor([-1.0, 0.5, 0.0, -2.0]), torch.zeros(4))
    torch.testing.assert_close(itm_loss(scores, targets), 0.5 * (match + mismatch))
    assert itm_loss(torch.tensor([[20.0, -20.0]]), torch.tensor([0])) < 1e-6  # a perfect separation


@torch.no_grad()
def margin(model, pixels, labels, texts) -> float:
    model.module.eval()
    scores = model.score_targets(pixels, model.text_targets(texts))
    own = F.one_hot(labels, len(texts)).bool()
    return (scores[own].mean() - scores[~own].mean()).item()


def test_itm_finetuning_separates_own_captions_and_trains_only_the_visual_side(folder):
    model = vilt(folder)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    pixels = 0.3 * images(6)
    pixels[labels == 0, 0] += 0.7  # the first concept's images are reddish, the second's bluish
    pixels[labels == 1, 2] += 0.7
    cfg = FinetuneParams(loss="itm", epochs=40, batch_size=3, weight_decay=0.01, towers="visual")
    start = margin(model, pixels, labels, CAPTIONS)
    log = finetune(model, pixels, labels, CAPTIONS[:2], cfg, 5e-3, progress=False, negatives=CAPTIONS[2:])
    assert log[0]["loss"] > 0 and log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert margin(model, pixels, labels, CAPTIONS) > start + 1.0  # own captions now score well above the others
    after = model.module.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("vilt.encoder.") for k in moved) and "rank_output.weight" in moved
    assert not any(k.startswith("vilt.embeddings.text_embeddings.") for k in moved)
    lr, wd, steps = 5e-3, 0.01, len(log)  # decay alone would scale a weight by (1 - lr wd)^steps
    w0, w1 = before["vilt.encoder.layer.0.attention.attention.query.weight"], after["vilt.encoder.layer.0.attention.attention.query.weight"]
    assert (w1 - w0).norm() > 10 * (1 - (1 - lr * wd) ** steps) * w0.norm()


def test_itm_with_one_caption_and_no_other_concept_is_refused(folder):
    model = vilt(folder)
    with pytest.raises(ParamsError, match=r"recipe 'solo'.*'itm'.*one caption"):
        finetune(model, images(2), torch.zeros(2, dtype=torch.long), CAPTIONS[:1], FinetuneParams(loss="itm"), 1e-3,
                 progress=False, recipe="solo")


def test_masked_word_finetuning_learns_the_caption_and_keeps_frozen_towers(folder):
    model = vilt(folder)
    assert isinstance(model, PredictsMaskedWords)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    noise = initial_pixels(4, 32, torch.Generator().manual_seed(0), "normal")  # implicit transfer's images
    labels = torch.tensor([0, 1, 0, 1])

    @torch.no_grad()
    def held_loss() -> float:  # the same masks before and after
        model.module.eval()
        return model.masked_word_loss(noise, model.word_masker(123)([CAPTIONS[int(k)] for k in labels])).item()

    start = held_loss()
    cfg = FinetuneParams(loss="mlm", epochs=15, batch_size=4, weight_decay=0.01, towers="both")
    log = finetune(model, noise, labels, CAPTIONS[:2], cfg, 5e-3, progress=False)
    assert log[0]["loss"] > 0 and held_loss() < start - 0.5
    after = model.module.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"vilt.embeddings.text_embeddings.word_embeddings.weight", "mlm_score.decoder.bias"} <= moved

    model.module.load_state_dict(before)  # the text tower alone: nothing else moves
    finetune(model, noise, labels, CAPTIONS[:2], dataclasses.replace(cfg, towers="text", epochs=1), 5e-3,
             progress=False)
    after = model.module.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("vilt.embeddings.text_embeddings.") for k in moved)


def test_word_masker_masks_whole_words_about_fifteen_percent_and_is_seeded(folder):
    model = vilt(folder)
    texts = ["a heart with a blicket and a lung scan of the chest"] * 64
    first, again = model.word_masker(7)(texts), model.word_masker(7)(texts)
    assert torch.equal(first["input_ids"], again["input_ids"])
    masked = first["labels"] != -100
    assert (first["input_ids"][masked] == model.tokenizer.mask_token_id).float().mean() > 0.6  # ViLT's 80% [MASK]
    content = first["attention_mask"].bool() & ~torch.isin(first["input_ids"], torch.tensor(
        [model.tokenizer.cls_token_id, model.tokenizer.sep_token_id]))
    assert 0.08 < masked.sum() / (content.sum()) < 0.25
    tokens = model.tokenizer("blicket", add_special_tokens=False)["input_ids"]
    assert len(tokens) > 1  # a word of several pieces in this vocabulary: masked all or none
    ids = model.tokenize(texts)["input_ids"]
    for row in range(len(texts)):
        where = [i for i in range(ids.shape[1] - len(tokens)) if ids[row, i:i + len(tokens)].tolist() == tokens]
        for i in where:
            assert len(set(masked[row, i:i + len(tokens)].tolist())) == 1


def test_masked_language_modelling_needs_the_mlm_head(tmp_path):
    model = vilt(write_vilt(tmp_path / "no-mlm", head="itm"))
    cfg = FinetuneParams(loss="mlm", epochs=1, batch_size=2)
    with pytest.raises(ModelLoadError, match=r"no masked-language-modelling head \(mlm_score\.\*\)"):
        finetune(model, images(2), torch.tensor([0, 1]), CAPTIONS[:2], cfg, 1e-3, progress=False)


def test_mlm_head_is_saved_and_loaded_with_the_checkpoint(folder, tmp_path):
    model = vilt(folder)
    masked = model.word_masker(0)(CAPTIONS)
    with torch.no_grad():
        expected = model.masked_word_loss(images(3), masked)
    model.save(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(vilt(tmp_path / "saved").masked_word_loss(images(3), masked), expected)


@pytest.mark.parametrize("loss, what", [("authors", "EmbedsImages"), ("eq2", None)])
def test_dual_encoder_objectives_on_a_cross_encoder(folder, loss, what):
    """The authors' InfoNCE needs image embeddings, which ViLT has not; Eq. 2 only needs scores.
    A temperature taken from the model needs text embeddings."""
    model = vilt(folder)
    cfg = FinetuneParams(loss=loss, epochs=1, batch_size=2, temperature=None)
    with pytest.raises(KtpipeError, match=what or "EmbedsTexts"):
        finetune(model, images(2), torch.tensor([0, 1]), CAPTIONS[:2], cfg, 1e-3, progress=False)
    if what is None:  # with a temperature of its own Eq. 2 trains a cross-encoder
        log = finetune(model, images(2), torch.tensor([0, 1]), CAPTIONS[:2],
                       dataclasses.replace(cfg, temperature=1.0), 1e-3, progress=False)
        assert log[0]["loss"] > 0


def test_normal_init_is_vilts_unit_gaussian_after_normalization():
    pixels = initial_pixels(64, 32, torch.Generator().manual_seed(0), "normal")
    assert 0 <= pixels.min() and pixels.max() <= 1 and abs(pixels.mean().item() - 0.5) < 0.01
    normalized = (pixels - 0.5) / 0.5  # ViLT's processor: mean and std 0.5
    assert 0.6 < normalized.std().item() < 0.9  # N(0, 1), clamped at +-1 by the pixel range
    with pytest.raises(ValueError, match="init must be one of"):
        initial_pixels(1, 4, torch.Generator(), "gaussian")


def test_inversion_records_vilts_settings(folder):
    from ktpipe.transfer.invert import inversion_choices
    from ktpipe.params import InvertParams

    choices = inversion_choices(InvertParams(init="normal", affine_p=0.0), vilt(folder))
    assert choices["image_size"] == 32 and choices["init"] == "normal" and choices["affine_p"] == 0.0
    assert "image processor: shorter side to 384 px" in choices["resize"] and "32x32" in choices["resize"]


# --- retrieval by rerank ---------------------------------------------------------------------------


def captioned_set(folder: Path, n: int, per_image: int) -> Manifest:
    records = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.new("RGB", (36, 32), (50 * i % 256, 90, 240 - 30 * i)).save(path)
        records.append(CaptionedImage(str(path), tuple(f"a heart {i} scan {j}" for j in range(per_image))))
    return Manifest("pairs", (), tuple(records))


def retrieval_input(manifest: Manifest, proposer: Path | None, k: int = 2) -> TaskInput:
    rerank = None if proposer is None else RerankParams(k=k, model=ModelParams(
        backend="open_clip", name=f"local-dir:{proposer}", device="cpu"))
    spec = DatasetParams(task="retrieval", format="captions", rerank=rerank)
    return TaskInput("pairs", manifest, spec, [], [], [], EvaluateParams(batch_size=4))


@torch.no_grad()
def brute_force(model, proposer, manifest: Manifest, k: int) -> dict[str, float]:
    """Recall@K of a rerank, query by query: the proposer's k best candidates in the cross-encoder's
    order, then the rest in the proposer's order."""
    captions, positives = caption_index(manifest)
    model.module.eval()
    pixels = torch.stack([model.preprocess(Image.open(p)) for p in manifest.paths])
    match = torch.stack([model.score_pairs(pixels, [c] * len(pixels)) for c in captions], dim=1)  # (N, T)
    small = torch.stack([proposer.preprocess(Image.open(p)) for p in manifest.paths])
    dual = proposer.encode_images(small) @ proposer.encode_texts(captions).T
    out = {}
    for direction, scores, cross, pos in (("i2t", dual, match, positives), ("t2i", dual.T, match.T, positives.T)):
        for K in (1, 5, 10):
            hits = []
            for q in range(scores.shape[0]):
                top = scores[q].argsort(descending=True).tolist()
                order = sorted(top[:k], key=lambda c: -cross[q, c].item()) + top[k:]
                hits.append(bool(pos[q, order[:K]].any()))
            out[f"{direction}_r{K}"] = sum(hits) / len(hits)
    return out


def test_rerank_matches_a_brute_force_reference_with_fewer_pair_passes(folder, tiny_checkpoint, tmp_path):
    manifest = captioned_set(tmp_path, 7, 2)
    model = vilt(folder)
    with torch.no_grad():
        model.module.rank_output.weight.mul_(300.0)  # a trained head's spread: pairs rank apart
    metrics = TASKS["retrieval"].evaluate(model, retrieval_input(manifest, tiny_checkpoint, k=3), progress=False)
    proposer = load_model("open_clip", f"local-dir:{tiny_checkpoint}", device="cpu")
    expected = brute_force(model, proposer, manifest, k=3)
    assert {key: metrics[key] for key in expected} == pytest.approx(expected)
    assert metrics["rerank_k"] == 3 and metrics["pairs_scored"] <= 3 * (7 + 14) < 7 * 14


def test_rerank_of_every_candidate_equals_all_pairs(folder, tiny_checkpoint, tmp_path):
    manifest = captioned_set(tmp_path, 5, 1)  # 5 images, 5 captions: k = 5 rescores every pair
    model = vilt(folder)
    reranked = TASKS["retrieval"].evaluate(model, retrieval_input(manifest, tiny_checkpoint, k=5), progress=False)
    every = TASKS["retrieval"].evaluate(model, retrieval_input(manifest, None), progress=False)
    assert every["pairs_scored"] == 25 and reranked["pairs_scored"] == 25
    drop = ("pairs_scored", "rerank_k")
    assert {k: v for k, v in reranked.items() if k not in drop} == pytest.approx(
        {k: v for k, v in every.items() if k not in drop})


@pytest.mark.parametrize("k", [0, 8])
def test_rerank_k_outside_the_set_is_an_error_naming_the_key(folder, tiny_checkpoint, tmp_path, k):
    manifest = captioned_set(tmp_path, 4, 2)  # 4 images, 8 captions: k in [1, 4]
    with pytest.raises(ParamsError, match=rf"evaluate.sets.pairs.rerank.k' is {k}.*\[1, 4\]"):
        TASKS["retrieval"].evaluate(vilt(folder), retrieval_input(manifest, tiny_checkpoint, k=k), progress=False)


def test_rerank_asked_of_a_dual_encoder_and_a_cross_encoder_proposer_are_errors(folder, tiny_checkpoint, tmp_path):
    manifest = captioned_set(tmp_path, 4, 1)
    dual = load_model("open_clip", f"local-dir:{tiny_checkpoint}", device="cpu")
    with pytest.raises(ParamsError, match=r"evaluate.sets.pairs.rerank': rerank rescores .* dual encoder"):
        TASKS["retrieval"].evaluate(dual, retrieval_input(manifest, tiny_checkpoint), progress=False)
    spec = DatasetParams(task="retrieval", format="captions", rerank=RerankParams(
        k=2, model=ModelParams(backend="vilt", name=f"local-dir:{folder}", device="cpu")))
    data = TaskInput("pairs", manifest, spec, [], [], [], EvaluateParams(batch_size=4))
    with pytest.raises(ParamsError, match=r"rerank.model' must name a dual encoder"):
        TASKS["retrieval"].evaluate(vilt(folder), data, progress=False)


def test_rerank_params_are_checked_when_loaded(tmp_path):
    from ktpipe.params import validate_sets

    with pytest.raises(ParamsError, match=r"'evaluate.sets.s.rerank.k' must be at least 1"):
        validate_sets({"s": DatasetParams(task="retrieval", format="demo", rerank=RerankParams(k=0))})
    with pytest.raises(ParamsError, match=r"'evaluate.sets.s.rerank' applies to task 'retrieval' only"):
        validate_sets({"s": DatasetParams(format="demo", rerank=RerankParams(k=2))})
