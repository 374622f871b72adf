"""Fine-tuning recipe options: concept subsets, the noise-image ablation and the lr multiplier."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ktpipe.transfer.finetune as finetune_module
from conftest import DEMO_CONCEPTS_FILE, DEMO_CONCEPTS, NOVEL, deep_merge, tiny_params
from ktpipe.concepts import ConceptsError, load_concepts_file, write_concept_files
from ktpipe.transfer.finetune import choose_concepts, noise_images, run_finetune, training_set
from ktpipe.transfer.invert import concept_seed, save_inversion
from ktpipe.params import FinetuneParams, Params, build_section, validate

SAMPLES, SIZE = 2, 16
KNOWN = [c for c in DEMO_CONCEPTS if c not in NOVEL]


def make_params(checkpoint: Path, **overrides) -> Params:
    """Validated params of the tiny project (`recipes` replaces the default recipes)."""
    raw = deep_merge(tiny_params(checkpoint), {"invert": {"samples": SAMPLES}})
    raw["recipes"] = overrides.pop("recipes", raw["recipes"])
    return validate(build_section(Params, deep_merge(raw, overrides)))


def fill_value(name: str) -> float:
    """The constant pixel value of a concept's fake inversion, distinct per concept."""
    return (DEMO_CONCEPTS.index(name) + 1) / 20


@pytest.fixture(scope="module")
def concepts_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("concepts")
    write_concept_files([load_concepts_file(DEMO_CONCEPTS_FILE)[name] for name in DEMO_CONCEPTS], out)
    return out


@pytest.fixture(scope="module")
def inverted_dir(tmp_path_factory) -> Path:
    """Fake inversions: each concept's images are constant at `fill_value(name)`."""
    out = tmp_path_factory.mktemp("inverted")
    for name in DEMO_CONCEPTS:
        save_inversion(out / name, torch.full((SAMPLES, 3, SIZE, SIZE), fill_value(name)), torch.zeros(SAMPLES), {})
    return out


def concept_of_each_image(data) -> list[str]:
    """Which concept each image came from, read off its fill value."""
    by_value = {round(fill_value(n), 4): n for n in DEMO_CONCEPTS}
    return [by_value[round(float(x.mean()), 4)] for x in data.pixels]


# --- which concepts a recipe learns ---------------------------------------------------------


@pytest.mark.parametrize("rehearsal, expected", [
    (False, ["blicket", "wug"]),
    (True, ["blicket", "wug", *KNOWN]),
])
def test_recipe_concepts_pick_labels_and_captions(tiny_checkpoint, concepts_dir, inverted_dir, rehearsal, expected):
    params = make_params(tiny_checkpoint, recipes={"two": {"concepts": ["wug", "blicket"], "rehearsal": rehearsal}})
    data = training_set(params, params.recipe("two"), concepts_dir, inverted_dir)
    assert data.concepts == expected  # params order, dax left out
    assert data.captions[:2] == ["A blicket is a striped orange ring.", "A wug is a solid purple crescent."]
    assert len(data.captions) == len(expected)
    assert data.labels.tolist() == [k for k in range(len(expected)) for _ in range(SAMPLES)]
    assert [data.concepts[k] for k in data.labels.tolist()] == concept_of_each_image(data)


def test_no_recipe_concepts_means_every_novel_concept(tiny_checkpoint, concepts_dir, inverted_dir):
    params = make_params(tiny_checkpoint)
    data = training_set(params, params.recipe("paper"), concepts_dir, inverted_dir)
    assert data.concepts == NOVEL and data.pixels.shape == (len(NOVEL) * SAMPLES, 3, SIZE, SIZE)


@pytest.mark.parametrize("names", [["lantern"], ["dax", "comet"]])
def test_recipe_concept_that_is_not_novel_is_an_error(tiny_checkpoint, concepts_dir, inverted_dir, names):
    params = make_params(tiny_checkpoint, recipes={"bad": {"concepts": names}})
    with pytest.raises(ConceptsError, match="not novel"):
        training_set(params, params.recipe("bad"), concepts_dir, inverted_dir)


def test_empty_recipe_concepts_leave_nothing_to_learn():
    concepts = [load_concepts_file(DEMO_CONCEPTS_FILE)[name] for name in DEMO_CONCEPTS]
    with pytest.raises(ConceptsError, match="novel"):
        choose_concepts(concepts, FinetuneParams(concepts=(), rehearsal=True))


# --- noise images instead of inversions (ablation) ------------------------------------------


def test_noise_images_shape_range_and_seed():
    a, b, c = noise_images(3, 8, seed=1), noise_images(3, 8, seed=1), noise_images(3, 8, seed=2)
    assert a.shape == (3, 3, 8, 8) and a.min() >= 0.0 and a.max() <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.4 < a.mean().item() < 0.6 and a.std().item() > 0.25  # uniform, not constant


def test_noise_mode_never_reads_inverted_folders(tiny_checkpoint, concepts_dir, tmp_path):
    params = make_params(tiny_checkpoint, recipes={"noise": {"images": "noise", "rehearsal": True}})
    missing = tmp_path / "no-inverted-images-here"
    data = training_set(params, params.recipe("noise"), concepts_dir, missing, image_size=SIZE)
    assert not missing.exists()
    assert data.concepts == DEMO_CONCEPTS
    assert data.pixels.shape == (len(DEMO_CONCEPTS) * SAMPLES, 3, SIZE, SIZE)
    assert data.pixels.min() >= 0.0 and data.pixels.max() <= 1.0
    with pytest.raises(ValueError, match="input size"):
        training_set(params, params.recipe("noise"), concepts_dir, missing)


def test_noise_images_are_seeded_per_concept_and_differ_from_inversions(tiny_checkpoint, concepts_dir, inverted_dir):
    recipes = {"noise": {"images": "noise"}, "paper": {}}
    params = make_params(tiny_checkpoint, recipes=recipes)
    noise = training_set(params, params.recipe("noise"), concepts_dir, inverted_dir, image_size=SIZE)
    again = training_set(params, params.recipe("noise"), concepts_dir, inverted_dir, image_size=SIZE)
    seed_1 = make_params(tiny_checkpoint, recipes=recipes, seed=1)
    other_seed = training_set(seed_1, seed_1.recipe("noise"), concepts_dir, inverted_dir, image_size=SIZE)
    inverted = training_set(params, params.recipe("paper"), concepts_dir, inverted_dir, image_size=SIZE)
    assert torch.equal(noise.pixels, again.pixels)
    assert not torch.equal(noise.pixels, other_seed.pixels)
    assert not torch.allclose(noise.pixels, inverted.pixels, atol=0.1)
    assert torch.equal(noise.labels, inverted.labels) and noise.captions == inverted.captions
    blicket, dax = noise.pixels[:SAMPLES], noise.pixels[SAMPLES:2 * SAMPLES]
    assert not torch.equal(blicket, dax)  # each concept its own noise
    inversion_start = torch.rand(SAMPLES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(
        concept_seed(params.seed, "blicket")))
    assert not torch.equal(blicket, inversion_start)  # not the noise the inversion started from


# --- learning rate ---------------------------------------------------------------------------


def test_lr_multiplier_reaches_the_optimizer_and_the_summary(tiny_checkpoint, concepts_dir, tmp_path, monkeypatch):
    seen = []
    build = finetune_module.build_optimizer

    def spy(params, cfg, lr):
        optimizer = build(params, cfg, lr)
        seen.append([group["lr"] for group in optimizer.param_groups])
        return optimizer

    monkeypatch.setattr(finetune_module, "build_optimizer", spy)
    recipe = {"images": "noise", "concepts": ["dax"], "lr_multiplier": 10.0, "loss": "authors"}
    params = make_params(tiny_checkpoint, recipes={"fast": recipe})
    log_path = tmp_path / "fast.json"
    summary = run_finetune(params, "fast", concepts_dir, tmp_path / "missing", tmp_path / "model", log_path)
    assert seen == [[pytest.approx(1e-3)]]  # params.lr 1e-4 times 10
    assert summary["lr"] == pytest.approx(1e-3) and summary["base_lr"] == pytest.approx(1e-4)
    assert summary["lr_multiplier"] == 10.0 and summary["images"] == "noise"
    assert summary["concepts"] == ["dax"] and summary["n_images"] == SAMPLES
    assert json.loads(log_path.read_text())["lr"] == pytest.approx(1e-3)
    assert (tmp_path / "model").is_dir()
