"""ViLT backend on a tiny random-init ViLT written offline: the match head (retrieval head, or the
two-way pretraining head mapped to its log-odds, or a refusal), pair scores, the 40-token text
limit (evaluation cuts, fine-tuning refuses), ViLT's image processor with its pixel mask, ViLT's
80/10/10 masking, save and load, the tower split, the inversion objective and retrieval pair by pair."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import ktpipe.models.vilt as vilt_module
from archs import write_vilt
from ktpipe.models import ModelLoadError, ScoresPairs, load_base_text_budget, load_model
from ktpipe.models.vilt import ITM_HEAD
from ktpipe.params import ModelParams

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def vilt_folder(tmp_path_factory) -> Path:
    return write_vilt(tmp_path_factory.mktemp("vilt"))


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_retrieval_checkpoint_scores_every_pair_as_pair_by_pair(vilt_folder, monkeypatch):
    model = load_model("vilt", f"local-dir:{vilt_folder}", device="cpu")
    assert isinstance(model, ScoresPairs) and model.kind == "cross_encoder" and model.image_size == 32
    texts = ["a photo of a heart", "a chest x ray", "a lung scan with a tumor"]
    images = pixels(4)
    monkeypatch.setattr(vilt_module, "PAIR_CHUNK", 5)  # 12 pairs in passes of 5
    with torch.no_grad():
        grid = model.score_targets(images, model.text_targets(texts))
        expected = torch.stack([model.score_pairs(images, [t] * 4) for t in texts], dim=1)
    assert grid.shape == (4, 3)
    torch.testing.assert_close(grid, expected, rtol=1e-5, atol=1e-5)
    assert grid.std() > 0  # a real head: pairs score differently


def test_two_way_head_becomes_its_log_odds(tmp_path):
    folder = write_vilt(tmp_path / "itm", head="itm")
    model = load_model("vilt", f"local-dir:{folder}", device="cpu")
    state = load_file(str(folder / WEIGHTS))
    weight, bias = state[ITM_HEAD[0]], state[ITM_HEAD[1]]
    images = pixels(5, seed=3)
    tokens = model.tokenize(["a heart"] * 5)
    with torch.no_grad():
        mask = torch.ones(5, 32, 32, dtype=torch.long)
        pooled = model.module.vilt(pixel_values=(images - 0.5) / 0.5, pixel_mask=mask, **tokens).pooler_output
        match_probability = torch.softmax(pooled @ weight.T + bias, dim=-1)[:, 1]
        logits = model.score_pairs(images, ["a heart"] * 5)
    torch.testing.assert_close(torch.sigmoid(logits), match_probability, rtol=1e-5, atol=1e-6)
    assert torch.equal(logits.argsort(), match_probability.argsort())


def test_checkpoint_without_a_match_head_is_refused(tmp_path):
    folder = write_vilt(tmp_path / "headless", head="none")
    with pytest.raises(ModelLoadError, match=r"no image-text matching head.*rank_output.weight.*itm_score.fc.weight"):
        load_model("vilt", f"local-dir:{folder}", device="cpu")
    with pytest.raises(ModelLoadError, match="cannot load ViLT checkpoint"):
        load_model("vilt", f"local-dir:{tmp_path / 'nowhere'}", device="cpu")


def test_text_over_forty_tokens_is_an_error_naming_it(vilt_folder):
    model = load_model("vilt", f"local-dir:{vilt_folder}", device="cpu")
    long = " ".join(["heart"] * 45)
    with pytest.raises(ModelLoadError, match=r"has 47 tokens; ViLT reads at most 40"):
        model.text_targets(["a heart", long])
    budget = load_base_text_budget(ModelParams(backend="vilt", name=f"local-dir:{vilt_folder}"))
    assert budget.context_length == 40 and budget.count(long) == 47 and budget.count(budget.kept(long)) == 40


def test_save_and_load_keep_the_scores(vilt_folder, tmp_path):
    model = load_model("vilt", f"local-dir:{vilt_folder}", device="cpu")
    model.save(tmp_path / "saved")
    again = load_model("vilt", f"local-dir:{tmp_path / 'saved'}", device="cpu")
    images = pixels(2)
    with torch.no_grad():
        torch.testing.assert_close(again.score_pairs(images, ["a heart", "a lung"]),
                                   model.score_pairs(images, ["a heart", "a lung"]))


def test_towers_split_text_embeddings_from_the_rest(vilt_folder):
    model = load_model("vilt", f"local-dir:{vilt_folder}", device="cpu")
    names = {id(p): n for n, p in model.module.named_parameters()}
    text = {names[id(p)] for p in model.tower_parameters("text")}
    visual = {names[id(p)] for p in model.tower_parameters("visual")}
    assert text and all(n.startswith("vilt.embeddings.text_embeddings.") for n in text)
    assert not text & visual and text | visual == set(names.values())
    top = {names[id(p)] for p in model.tower_parameters("visual", last_blocks=1)}
    assert any(n.startswith("vilt.encoder.layer.1.") for n in top) and "rank_output.weight" in top
    assert not any(n.startswith(("vilt.encoder.layer.0.", "vilt.embeddings.")) for n in top)


def test_inversion_objective_is_the_match_log_probability_and_reaches_the_pixels(vilt_folder):
    model = load_model("vilt", f"local-dir:{vilt_folder}", device="cpu")
    images = pixels(3).requires_grad_(True)
    target = model.text_target("a heart")
    sims = model.similarity(images, target)
    with torch.no_grad():
        expected = torch.nn.functional.logsigmoid(model.score_pairs(images, ["a heart"] * 3))
    torch.testing.assert_close(sims.detach(), expected)
    assert (sims <= 0).all()
    sims.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_retrieval_scores_every_pair_through_vilt(vilt_folder, tmp_path):
    from ktpipe.datasets import CaptionedImage, Manifest
    from ktpipe.eval import TASKS
    from ktpipe.eval.base import TaskInput
    from ktpipe.eval.retrieval import caption_index, retrieval_metrics
    from ktpipe.params import DatasetParams, EvaluateParams

    records = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 32), (60 * i, 30, 200 - 40 * i)).save(path)
        records.append(CaptionedImage(str(path), (f"a heart {i}", f"a lung scan {i}")))
    manifest = Manifest("pairs", (), tuple(records))
    model = load_model("vilt", f"local-dir:{vilt_folder}", device="cpu")
    data = TaskInput("pairs", manifest, DatasetParams(task="retrieval", format="captions"), [], [],
                     [], EvaluateParams(batch_size=3))
    metrics = TASKS["retrieval"].evaluate(model, data, progress=False)
    captions, positives = caption_index(manifest)
    with torch.no_grad():
        images = torch.stack([model.preprocess(Image.open(r.path)) for r in records])
        scores = torch.stack([model.score_pairs(images, [c] * 4) for c in captions], dim=1)
    assert metrics == pytest.approx({**retrieval_metrics(scores, positives), "pairs_scored": 4 * 8,
                                     "texts_truncated": 0})


def test_inversion_raises_the_match_probability(vilt_folder):
    from ktpipe.transfer.invert import invert_text
    from ktpipe.params import InvertParams

    model = load_model("vilt", f"local-dir:{vilt_folder}", device="cpu")
    with torch.no_grad():  # a trained head's scale: at init (std 0.02) every pair scores about 0
        model.module.rank_output.weight.mul_(300.0)
    cfg = InvertParams(steps=60, lr=0.2, samples=3, affine_p=0.0, tv_weight=0.0)
    noise = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = model.score_pairs(noise, ["a heart"] * 3)
    images, sims = invert_text(model, "a heart", cfg, seed=0, progress=False)
    assert images.shape == (3, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    with torch.no_grad():
        end = model.score_pairs(images, ["a heart"] * 3)
    torch.testing.assert_close(sims, torch.nn.functional.logsigmoid(end))
    assert (end > start.max() + 0.1).all()  # every image's match logit rose (random init saturates near +0.16)


def test_evaluation_cuts_texts_over_forty_tokens_and_counts_them(vilt_folder, tmp_path):
    from ktpipe.datasets import CaptionedImage, LabeledImage, Manifest
    from ktpipe.eval import TASKS
    from ktpipe.eval.base import TaskInput
    from ktpipe.eval.retrieval import caption_index, retrieval_metrics
    from ktpipe.params import DatasetParams, EvaluateParams

    model = load_model("vilt", f"local-dir:{vilt_folder}", device="cpu")
    with torch.no_grad():
        model.module.rank_output.weight.mul_(300.0)  # pairs rank apart
    long = "a chest x ray of a " + " ".join(["heart"] * 45)
    cut = model.fit_texts(["a heart", long])
    assert cut[0] == "a heart" and model.tokenize(cut)["input_ids"].shape == (2, 40)
    assert model.tokenizer(cut[1])["input_ids"] == model.tokenizer(long, truncation=True, max_length=40)["input_ids"]
    with pytest.raises(ModelLoadError, match="ViLT reads at most 40"):  # fine-tuning captions keep the refusal
        model.text_targets([long])

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (32, 32), (120 * i, 30, 200)).save(paths[-1])
    manifest = Manifest("pairs", (), (CaptionedImage(str(paths[0]), (long, "a heart")),
                                      CaptionedImage(str(paths[1]), ("a lung scan",))))
    data = TaskInput("pairs", manifest, DatasetParams(task="retrieval", format="captions"), [], [], [],
                     EvaluateParams(batch_size=2))
    metrics = TASKS["retrieval"].evaluate(model, data, progress=False)
    captions, positives = caption_index(manifest)
    with torch.no_grad():
        images = torch.stack([model.preprocess(Image.open(p)) for p in paths])
        scores = torch.stack([model.score_pairs(images, [c] * 2) for c in model.fit_texts(captions)], dim=1)
    assert metrics == pytest.approx({**retrieval_metrics(scores, positives), "pairs_scored": 6, "texts_truncated": 1})

    labeled = Manifest("classes", ("heart", "lung"), (LabeledImage(str(paths[0]), 0), LabeledImage(str(paths[1]), 1)))
    templates = ["a photo of a {}.", "a chest x ray of a {} " + " ".join(["heart"] * 45)]
    data = TaskInput("classes", labeled, DatasetParams(task="classification", format="folder"), [], templates, [],
                     EvaluateParams(batch_size=2))
    assert TASKS["classification"].evaluate(model, data, progress=False)["texts_truncated"] == 2


def test_images_keep_their_aspect_through_vilts_processor_with_a_pixel_mask(vilt_folder, tmp_path):
    from transformers import ViltProcessor

    from ktpipe.eval.classification import image_batches
    from ktpipe.models.base import PaddedPixels

    model = load_model("vilt", f"local-dir:{vilt_folder}", device="cpu")
    with torch.no_grad():
        model.module.rank_output.weight.mul_(300.0)
    wide = Image.new("RGB", (300, 200), (200, 40, 90))
    wide.paste((20, 220, 60), (150, 50, 250, 150))
    tall = wide.transpose(Image.Transpose.ROTATE_90)
    assert model.preprocess(wide).shape == (3, 384, 576) and model.preprocess(tall).shape == (3, 576, 384)
    for i, image in enumerate((wide, tall)):
        image.save(tmp_path / f"{i}.png")
    batch = next(iter(image_batches(model, (str(tmp_path / "0.png"), str(tmp_path / "1.png")), 2, progress=False)))
    assert isinstance(batch, PaddedPixels) and batch.pixels.shape == (2, 3, 576, 576)
    assert batch.mask[0, :384].all() and not batch.mask[0, 384:].any()  # the wide image: padding rows are 0
    assert batch.mask[1, :, :384].all() and not batch.mask[1, :, 384:].any()

    texts = ["a heart", "a lung scan"]
    reference = ViltProcessor.from_pretrained(vilt_folder)(images=[wide, tall], text=texts, padding="max_length",
                                                           max_length=40, return_tensors="pt")
    inputs = model._pixel_inputs(batch)
    assert torch.equal(inputs["pixel_mask"], reference["pixel_mask"])
    torch.testing.assert_close(inputs["pixel_values"], reference["pixel_values"], rtol=0, atol=1e-5)
    with torch.no_grad():
        scores = model.score_pairs(batch, texts)
        expected = model.module(**reference).logits[:, 0]
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert scores.std() > 0
    square = pixels(2)  # inverted images: as they are, the mask all ones
    with torch.no_grad():
        torch.testing.assert_close(model.score_pairs(square, texts), model.score_pairs(
            PaddedPixels(square, torch.ones(2, 32, 32, dtype=torch.long)), texts))


def test_masked_tokens_are_80_percent_mask_10_random_10_kept_and_the_demo_keeps_all_mask(vilt_folder):
    from ktpipe.demo.vilt import build_demo_vilt

    model = load_model("vilt", f"local-dir:{vilt_folder}", device="cpu")
    words = "a heart with a lung scan of the chest x ray and a tumor with pneumonia normal"
    texts = [" ".join(words.split()[i % 5:] + words.split()[:i % 5]) for i in range(600)]
    masked = model.word_masker(3)(texts)
    picked = masked["labels"] != -100
    given, truth = masked["input_ids"][picked], masked["labels"][picked]
    assert picked.sum() > 1000
    as_mask = (given == model.tokenizer.mask_token_id).float().mean().item()
    kept = (given == truth).float().mean().item()
    assert abs(as_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.03 and abs(1 - as_mask - kept - 0.1) < 0.03
    content = masked["attention_mask"].bool().sum() - 2 * len(texts)
    assert abs(picked.sum().item() / content.item() - 0.15) < 0.03

    demo = build_demo_vilt(set())
    assert demo.resize_rule.startswith("shorter side to 32 px")  # the demo's square crop
    assert demo.preprocess(Image.new("RGB", (48, 32))).shape == (3, 32, 32)
    demo_masked = demo.word_masker(3)(["a photo of a red circle."] * 200)
    picked = demo_masked["labels"] != -100
    assert picked.any() and (demo_masked["input_ids"][picked] == demo.tokenizer.mask_token_id).all()
