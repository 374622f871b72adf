"""The interfaces take model families and tasks the code has never seen: a fake cross-encoder, a
fake captioner and a fake second task (tests/fakes.py) are registered like real ones and run
through the ordinary inversion, fine-tuning and evaluation functions, with no branch added for them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fakes import FakeCaptioner, FakeCaptionMatch, FakeCrossEncoder
from ktpipe import eval as evaluation
from ktpipe import models
from ktpipe.concepts import ConceptText, write_concept_files
from ktpipe.datasets import CaptionedImage, Manifest, build_manifest, write_manifest
from ktpipe.transfer.finetune import TrainingSet, run_finetune, training_set
from ktpipe.images import load_inversion
from ktpipe.transfer.invert import invert_text, run_invert
from ktpipe.models import (EmbedsImages, EmbedsTexts, GeneratesCaptions, Invertible, ScoresPairs, Trainable,
                           load_checkpoint)
from ktpipe.params import InvertParams, build_section, Params, validate

CONCEPTS = [ConceptText("blicket", "a striped orange ring"), ConceptText("dax", "a pink triangle"),
            ConceptText("lantern", "a solid yellow square", role="known")]
COLORS = {"blicket": (255, 140, 0), "dax": (255, 105, 180), "lantern": (255, 220, 0)}


def test_each_fake_has_only_the_capabilities_it_implements():
    cross, captioner = FakeCrossEncoder(), FakeCaptioner()
    for fake in (cross, captioner):
        assert isinstance(fake, (Invertible, ScoresPairs, Trainable)) and isinstance(fake, ScoresPairs)
        assert isinstance(fake, Invertible) and isinstance(fake, Trainable)
        assert not isinstance(fake, EmbedsTexts) and not isinstance(fake, EmbedsImages)
    assert isinstance(captioner, GeneratesCaptions) and not isinstance(cross, GeneratesCaptions)


def test_inversion_raises_a_cross_encoders_match_score():
    fake = FakeCrossEncoder()
    cfg = InvertParams(steps=25, samples=3, lr=0.1)
    start = torch.rand(cfg.samples, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = fake.similarity(start, "a blicket").mean()
    pixels, scores = invert_text(fake, "a blicket", cfg, seed=5, progress=False, name="blicket")
    assert pixels.shape == (3, 3, 16, 16) and scores.shape == (3,)
    assert scores.mean() > before + 0.03  # measured: -0.033 -> 0.032
    with torch.no_grad():
        torch.testing.assert_close(scores, fake.similarity(pixels, "a blicket"))


def write_images(folder: Path, names: list[str], n: int = 3) -> list[tuple[Path, int]]:
    """n noisy solid-color 16 px PNGs per concept; (path, label) pairs."""
    rng = np.random.default_rng(0)
    items = []
    for label, name in enumerate(names):
        for i in range(n):
            pixels = np.clip(np.array(COLORS[name]) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            path = folder / f"{name}_{i}.png"
            Image.fromarray(pixels).save(path)
            items.append((path, label))
    return items


def caption_margin(model, data: TrainingSet) -> float:
    """Mean score of each training image's own caption minus the mean of the other captions."""
    with torch.no_grad():
        scores = model.score_targets(data.pixels, model.text_targets(data.captions))  # (N, K)
    own = scores.gather(1, data.labels[:, None]).squeeze(1)
    others = (scores.sum(1) - own) / (scores.shape[1] - 1)
    return float((own - others).mean())


def fake_params(backend: str, sets: dict) -> Params:
    raw = {
        "concepts": {"names": [c.name for c in CONCEPTS]},
        "model": {"backend": backend, "name": "fake", "device": "cpu"},
        "invert": {"steps": 15, "samples": 2, "lr": 0.1},
        "finetune": {"epochs": 3, "batch_size": 2, "towers": "visual", "temperature": 0.5, "loss": "eq2",
                     "rehearsal": True},
        "lr": 0.05,
        "recipes": {"paper": {}},
        "evaluate": {"templates": "demo", "sets": sets},
    }
    return validate(build_section(Params, raw))


@pytest.mark.parametrize("family", [FakeCrossEncoder, FakeCaptioner])
def test_fakes_run_through_inversion_finetuning_and_evaluation(family, tmp_path, monkeypatch):
    backend = f"fake_{family.__name__.lower()}"
    monkeypatch.setitem(models.BACKENDS, backend, family.load)
    monkeypatch.setitem(evaluation.TASKS, FakeCaptionMatch.name, FakeCaptionMatch())
    eval_dir, images = tmp_path / "eval", tmp_path / "images"
    eval_dir.mkdir(), images.mkdir()
    names = [c.name for c in CONCEPTS]
    items = write_images(images, names)
    write_manifest(build_manifest("shapes", names, items), eval_dir / "shapes.parquet")
    sets = {"shapes": {"format": "folder", "root": str(images)}}
    if family is FakeCaptioner:  # the second task reads images with reference captions
        records = tuple(CaptionedImage(str(p), (f"a {'ring' if k == 0 else 'square'}",)) for p, k in items)
        write_manifest(Manifest("captions", (), records), eval_dir / "captions.parquet")
        sets["captions"] = {"task": "caption_match", "format": "folder", "root": str(images)}
    params = fake_params(backend, sets)
    write_concept_files(CONCEPTS, tmp_path / "concepts")

    for concept in CONCEPTS:  # inversion: every concept's images, scored higher than where they started
        meta = run_invert(params, tmp_path / "concepts" / f"{concept.name}.json", tmp_path / "inverted" / concept.name)
        assert meta["image_size"] == 16 and load_inversion(tmp_path / "inverted" / concept.name).shape == (2, 3, 16, 16)

    summary = run_finetune(params, "paper", tmp_path / "concepts", tmp_path / "inverted", tmp_path / "models/paper",
                           tmp_path / "finetune.json")
    losses = [step["loss"] for step in summary["log"]]
    assert losses[0] > 0 and losses[-1] < losses[0]  # Eq. 2 on the cross-encoder's pair scores learns
    tuned, base = load_checkpoint(params.model, tmp_path / "models/paper"), family()
    moved = sum((a - b).abs().sum() for a, b in zip(tuned.module["visual"].parameters(),
                                                    base.module["visual"].parameters()))
    assert moved > 0 and torch.equal(tuned.module["text"].weight, base.module["text"].weight)  # visual only
    data = training_set(params, params.recipe("paper"), tmp_path / "concepts", tmp_path / "inverted", 16)
    before, after = (caption_margin(m, data) for m in (base, tuned))
    assert after > before + 0.1, (before, after)  # own caption over the others: measured 0.026 -> 0.166

    results = {m: evaluation.run_evaluate(params, m, tmp_path / "models" / m, eval_dir, tmp_path / "concepts",
                                          tmp_path / f"{m}.json") for m in ("baseline", "paper")}
    for result in results.values():
        accuracy = result["metrics"]["shapes"]["classification"]
        assert accuracy["n_images"] == 9 and 0 <= accuracy["name_overall_acc"] <= 1
        assert set(result["summary"]["shapes"]["classification"]) >= {"target", "retention"}
        if family is FakeCaptioner:
            assert 0 <= result["metrics"]["captions"]["caption_match"]["match"] <= 1
            assert result["tasks"] == {"shapes": "classification", "captions": "caption_match"}
