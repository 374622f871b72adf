"""Training safeguards and the authors'-code options: the authors' InfoNCE and Eq. 2's one-caption
refusal, distillation, non-finite params and losses, inversion options and min-max PNG pixels."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from ruamel.yaml import YAML

from conftest import DEMO_CONCEPTS, NOVEL, deep_merge, make_project, run_stage_here, tiny_params
from ktpipe.describe import run_concepts
from ktpipe.errors import KtpipeError, NonFiniteError
from ktpipe.transfer.finetune import check_capabilities, finetune, minmax_png, run_finetune
from ktpipe.images import save_inversion
from ktpipe.transfer.invert import (
    inversion_choices,
    inversion_loss,
    invert_text,
    random_affine,
    to_model_size,
)
from ktpipe.transfer.losses import authors_infonce, distillation_loss, eq2_loss
from ktpipe.models import OpenClipModel
from ktpipe.params import ConceptsParams, FinetuneParams, InvertParams, ParamsError, load_params

TEXT = "a striped orange ring"
CAPTIONS = ["A blicket is a striped orange ring.", "A wug is a solid purple crescent."]
SAMPLES, SIZE = 2, 16  # inverted images per concept, tiny model's input side
FINETUNE_ARGS = ("paper", "data/concepts", "data/inverted", "models/paper", "metrics/finetune/paper.json")


def unit_rows(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def load_tiny(folder: Path) -> OpenClipModel:
    """A fresh model from a checkpoint folder (tests may train or freeze it)."""
    return OpenClipModel.load(f"local-dir:{folder}")


def state(model: OpenClipModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: OpenClipModel) -> None:
    """Bit-identical weights (NaN where NaN was)."""
    after = model.module.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=f"{key} changed")


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def nan_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with NaN in the visual projection (the last visual weight)."""
    model = load_tiny(tiny_checkpoint)
    with torch.no_grad():
        model.module.visual.proj.fill_(float("nan"))
    folder = tmp_path_factory.mktemp("nan") / "checkpoint"
    model.save(folder)
    assert load_tiny(folder).module.visual.proj.isnan().all()
    return folder


# --- the authors' InfoNCE -------------------------------------------------------------------


def authors_reference(image_emb: torch.Tensor, text_emb: torch.Tensor, targets: list[int], t: float) -> float:
    """2B anchors: the images, then each image's caption. Anchor i's positive is i + B (mod 2B);
    log p_i = s_ip / T - log sum_{j != i} exp(s_ij / T); loss = -(T / 0.07) mean_i log p_i."""
    b = len(targets)
    features = [image_emb[i].tolist() for i in range(b)] + [text_emb[k].tolist() for k in targets]
    total = 0.0
    for i in range(2 * b):
        positive = (i + b) % (2 * b)
        s = [dot(features[i], features[j]) / t for j in range(2 * b)]
        log_denominator = math.log(sum(math.exp(s[j]) for j in range(2 * b) if j != i))
        total += s[positive] - log_denominator
    return -(t / 0.07) * total / (2 * b)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
@pytest.mark.parametrize("targets", [[0], [1, 0], [2, 0, 1], [0, 2, 1, 2, 0], [1, 1, 0, 2, 2, 0, 1]],
                         ids=lambda t: f"B{len(t)}")
def test_authors_infonce_matches_brute_force(targets, temperature):
    image_emb, text_emb = unit_rows(len(targets), seed=len(targets)), unit_rows(3, seed=100)
    loss = authors_infonce(image_emb, text_emb[targets], temperature)  # each image's own caption row
    assert loss.item() == pytest.approx(authors_reference(image_emb, text_emb, targets, temperature), rel=1e-9, abs=1e-12)


def test_authors_infonce_accepts_a_tensor_temperature():
    image_emb, caption_emb = unit_rows(4), unit_rows(2, seed=1)[[0, 1, 1, 0]]
    torch.testing.assert_close(authors_infonce(image_emb, caption_emb, torch.tensor(0.2, dtype=torch.float64)),
                               authors_infonce(image_emb, caption_emb, 0.2))


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_authors_infonce_on_one_concept_still_has_a_gradient(temperature):
    """All images share one caption: Eq. 2 would give 0, here the images still repel each other."""
    image_emb = unit_rows(4, seed=3).requires_grad_(True)
    text_emb, targets = unit_rows(1, seed=4), [0, 0, 0, 0]
    loss = authors_infonce(image_emb, text_emb[targets], temperature)
    assert loss.item() > 0.1
    assert loss.item() == pytest.approx(authors_reference(image_emb.detach(), text_emb, targets, temperature), rel=1e-9)
    loss.backward()
    assert (image_emb.grad.norm(dim=-1) > 1e-3).all()


# --- Eq. 2 with one caption -----------------------------------------------------------------


def test_eq2_loss_with_one_caption_is_zero_with_zero_gradient():
    image_emb = unit_rows(4, seed=5).requires_grad_(True)
    loss = eq2_loss(image_emb @ unit_rows(1, seed=6).T, torch.zeros(4, dtype=torch.long), 0.07)  # (4, 1) scores
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(image_emb.grad, torch.zeros_like(image_emb))
    # ... while two captions do give a loss and a gradient
    image_emb.grad = None
    loss = eq2_loss(image_emb @ unit_rows(2, seed=6).T, torch.tensor([0, 1, 0, 1]), 0.07)
    loss.backward()
    assert loss.item() > 0 and image_emb.grad.abs().sum() > 0


@pytest.mark.parametrize("captions", [CAPTIONS[:1], [CAPTIONS[0], CAPTIONS[0]]], ids=["one", "repeated"])
def test_finetune_refuses_eq2_with_one_distinct_caption(tiny_checkpoint, captions):
    model = load_tiny(tiny_checkpoint)
    before = state(model)
    labels = torch.tensor([k % len(captions) for k in range(4)])
    with pytest.raises(ValueError, match="'solo'.*'eq2'"):
        finetune(model, images(4), labels, captions, FinetuneParams(loss="eq2"), 1e-3, progress=False, recipe="solo")
    assert_same_state(before, model)


def test_finetune_with_authors_loss_learns_one_concept(tiny_checkpoint):
    """Two AdamW steps: a loss above zero, every visual weight moved beyond what weight decay alone
    does, the text tower untouched, and each image closer to its caption."""
    model = load_tiny(tiny_checkpoint)
    before, pixels, lr = state(model), images(4), 1e-3
    with torch.no_grad():
        caption = model.encode_texts(CAPTIONS[:1])[0]
        start = model.encode_images(pixels) @ caption  # (4,) cosine of each image to the caption
    cfg = FinetuneParams(loss="authors", batch_size=2)
    log = finetune(model, pixels, torch.zeros(4, dtype=torch.long), CAPTIONS[:1], cfg, lr, progress=False,
                   recipe="solo")
    assert [r["step"] for r in log] == [0, 1]
    assert all(r["loss"] > 0 for r in log)
    # AdamW's decoupled decay alone would leave p0 * (1 - lr * wd) per step; Adam's first steps move
    # each parameter with a gradient by about lr, so the trained weights sit well away from that
    decay_only = (1 - lr * cfg.weight_decay) ** len(log)
    for name, weight in model.module.named_parameters():
        beyond_decay = (weight.detach() - decay_only * before[name]).abs().mean().item()
        if name.startswith("visual"):
            assert beyond_decay > lr / 2, f"{name} moved only {beyond_decay:.2e} beyond weight decay"
        else:
            assert torch.equal(weight.detach(), before[name]), f"{name} (text tower) changed"
    with torch.no_grad():
        end = model.encode_images(pixels) @ caption
    assert (end > start + 0.1).all(), (start.tolist(), end.tolist())  # each image moved toward its caption


def test_frozen_text_target_is_computed_in_eval_mode(tiny_checkpoint, monkeypatch):
    """BiomedCLIP's text tower has dropout: in train mode the frozen target would be one random sample."""
    model = load_tiny(tiny_checkpoint)
    modes = []
    encode_texts = model.encode_texts

    def spy(texts, *args, **kwargs):
        modes.append(model.module.training)
        return encode_texts(texts, *args, **kwargs)

    monkeypatch.setattr(model, "encode_texts", spy)
    finetune(model, images(4), torch.tensor([0, 1, 0, 1]), CAPTIONS[:2], FinetuneParams(batch_size=2), 1e-3,
             progress=False)
    assert modes == [False]  # embedded once, in eval mode, before training starts
    modes.clear()
    finetune(model, images(4), torch.tensor([0, 1, 0, 1]), CAPTIONS[:2], FinetuneParams(batch_size=2, towers="text"),
             1e-3, progress=False)
    assert modes == [True, True]  # a training text tower embeds the captions anew at every step


class PairScorer:
    """A trainable cross-encoder stand-in: scores pairs, embeds nothing."""

    image_size = SIZE
    resize_rule = "none: it reads no image file"
    module = torch.nn.Linear(1, 1)

    def preprocess(self, image):
        raise NotImplementedError

    def text_targets(self, texts):
        return texts

    def score_targets(self, pixels, targets):
        return torch.zeros(len(pixels), len(targets))

    def score_pairs(self, pixels, texts):
        return torch.zeros(len(pixels))

    def tower_parameters(self, tower, last_blocks=None):
        return self.module.parameters()

    def save(self, out_dir):
        raise NotImplementedError


@pytest.mark.parametrize("cfg, needed", [
    (FinetuneParams(loss="authors", temperature=0.07), "EmbedsImages"),
    (FinetuneParams(loss="eq2", temperature=0.07, kd_weight=1.0), "EmbedsImages"),
    (FinetuneParams(loss="eq2", temperature=None), "EmbedsTexts"),
], ids=["authors-loss", "distillation", "own-temperature"])
def test_finetune_names_the_capability_a_recipe_needs(cfg, needed):
    model = PairScorer()
    check_capabilities(model, FinetuneParams(loss="eq2", temperature=0.07), "ok")  # Eq. 2 needs scores only
    with pytest.raises(KtpipeError, match=rf"recipe 'cross'.*\({needed}\); PairScorer does not"):
        finetune(model, images(4), torch.tensor([0, 1, 0, 1]), CAPTIONS, cfg, 1e-3, progress=False, recipe="cross")


# --- fine-tuning's plumbing: optimizer, temperature, refusals, negatives ---------------------


@pytest.mark.parametrize("name, kind", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)])
def test_build_optimizer_is_the_recipes_optimizer_with_its_settings(name, kind):
    from ktpipe.transfer.finetune import build_optimizer

    weight = torch.nn.Parameter(torch.zeros(2))
    cfg = FinetuneParams(optimizer=name, weight_decay=0.3, betas=(0.8, 0.9), eps=1e-7)
    optimizer = build_optimizer([weight], cfg, 2e-3)
    assert type(optimizer) is kind
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"]) == (2e-3, 0.3, (0.8, 0.9), 1e-7)


def test_temperature_is_the_recipes_or_the_models_own(tiny_checkpoint):
    from ktpipe.transfer.finetune import temperature_of

    model = load_tiny(tiny_checkpoint)
    own = temperature_of(model, FinetuneParams(loss="authors"))
    assert float(own) == pytest.approx(1 / model.logit_scale().item())  # logits = cosine * logit scale
    assert temperature_of(model, FinetuneParams(loss="eq2", temperature=0.5)) == 0.5
    assert temperature_of(model, FinetuneParams(loss="itm")) is None  # a match logit has no temperature


def test_itm_needs_two_distinct_captions_counting_negatives():
    from ktpipe.transfer.finetune import check_objective

    check_objective(FinetuneParams(loss="itm"), CAPTIONS[:1], CAPTIONS[1:], "r")  # one caption, one negative: fine
    with pytest.raises(ParamsError, match="'itm'"):
        check_objective(FinetuneParams(loss="itm"), CAPTIONS[:1], CAPTIONS[:1], "r")
    check_objective(FinetuneParams(loss="eq2"), CAPTIONS, [], "r")
    with pytest.raises(ParamsError, match="'eq2'"):
        check_objective(FinetuneParams(loss="eq2"), CAPTIONS[:1], CAPTIONS[1:], "r")  # eq2 ignores negatives


def test_itm_scores_each_image_against_the_captions_and_new_negatives_once():
    from fakes import FakeCrossEncoder

    seen = []

    class Spy(FakeCrossEncoder):
        def text_targets(self, texts):
            seen.append(list(texts))
            return super().text_targets(texts)

    negatives = [CAPTIONS[1], "A dax is an outlined pink triangle.", CAPTIONS[0]]  # CAPTIONS[0] is a caption
    log = finetune(Spy(), images(2), torch.zeros(2, dtype=torch.long), CAPTIONS[:1], FinetuneParams(loss="itm"), 1e-3,
                   progress=False, negatives=negatives)
    assert seen == [[CAPTIONS[0], CAPTIONS[1], "A dax is an outlined pink triangle."]] and len(log) == 1


def test_finetune_refuses_no_images_and_takes_one():
    with pytest.raises(KtpipeError, match="no images"):
        finetune(None, torch.zeros(0, 3, SIZE, SIZE), torch.zeros(0, dtype=torch.long), CAPTIONS,
                 FinetuneParams(), 1e-3, progress=False)
    from fakes import FakeCrossEncoder

    log = finetune(FakeCrossEncoder(), images(1), torch.zeros(1, dtype=torch.long), CAPTIONS,
                   FinetuneParams(temperature=0.07), 1e-3, progress=False)
    assert len(log) == 1 and log[0]["loss"] > 0


def test_a_small_distillation_weight_still_distills(tiny_checkpoint):
    cfg = FinetuneParams(loss="authors", batch_size=2, kd_weight=0.5)
    log = finetune(load_tiny(tiny_checkpoint), images(4), torch.tensor([0, 0, 1, 1]), CAPTIONS, cfg, 1e-3,
                   progress=False)
    assert all("kd_loss" in r for r in log)


def test_a_non_finite_gradient_of_a_finite_loss_stops_before_the_step():
    from ktpipe.transfer.finetune import backward_step

    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    loss = weight.sqrt().sum()  # 0, with an infinite gradient at 0
    with pytest.raises(NonFiniteError, match="gradient norm"):
        backward_step(loss, optimizer, [weight], "r", 0)
    assert torch.equal(weight.detach(), torch.zeros(3))


# --- distillation ---------------------------------------------------------------------------


def test_distillation_loss_is_the_mean_squared_error():
    student, teacher = unit_rows(5, seed=7), unit_rows(5, seed=8)
    expected = sum((a - b) ** 2 for s, t in zip(student.tolist(), teacher.tolist()) for a, b in zip(s, t)) / 40
    assert distillation_loss(student, teacher).item() == pytest.approx(expected, rel=1e-12)
    assert distillation_loss(student, student).item() == 0.0


def drift(checkpoint: Path, kd_weight: float) -> tuple[float, list[dict]]:
    """Mean squared change of the training images' embeddings after 20 steps of fine-tuning."""
    model, pixels = load_tiny(checkpoint), images(4, seed=1)
    with torch.no_grad():
        start = model.encode_images(pixels)
    cfg = FinetuneParams(epochs=10, batch_size=2, loss="authors", kd_weight=kd_weight)
    log = finetune(model, pixels, torch.tensor([0, 0, 1, 1]), CAPTIONS, cfg, 1e-3, seed=0, progress=False)
    with torch.no_grad():
        return (model.encode_images(pixels) - start).pow(2).mean().item(), log


def test_distillation_is_logged_and_keeps_embeddings_near_the_frozen_model(tiny_checkpoint):
    free, free_log = drift(tiny_checkpoint, 0.0)
    held, held_log = drift(tiny_checkpoint, 100.0)
    assert len(free_log) == len(held_log) == 20
    assert all("kd_loss" not in r for r in free_log)
    assert all("kd_loss" in r for r in held_log)
    assert held_log[0]["kd_loss"] == 0.0  # the student starts as the teacher
    assert all(r["kd_loss"] > 0 for r in held_log[1:])
    assert held_log[0]["loss"] == free_log[0]["loss"]  # "loss" logs the contrastive term alone
    assert free > 0.05
    assert held < 0.5 * free


# --- non-finite and out-of-range params -----------------------------------------------------


def params_file(folder: Path, checkpoint: Path, overrides: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    with path.open("w") as fh:
        YAML(typ="safe", pure=True).dump(deep_merge(tiny_params(checkpoint), overrides), fh)
    return path


def test_tiny_params_file_loads(tmp_path, tiny_checkpoint):
    params = load_params(params_file(tmp_path, tiny_checkpoint, {"finetune": {"kd_weight": 0.5}}))
    assert params.lr == 1e-4 and params.finetune.kd_weight == 0.5


@pytest.mark.parametrize("overrides, key", [
    ({"lr": float("inf")}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"lr": float("-inf")}, "lr"),
    ({"invert": {"tv_weight": float("inf")}}, "invert.tv_weight"),
    ({"invert": {"lr": float("nan")}}, "invert.lr"),
    ({"finetune": {"temperature": float("inf")}}, "finetune.temperature"),
    ({"recipes": {"paper": {"kd_weight": float("nan")}}}, "recipes.paper.kd_weight"),
    ({"finetune": {"kd_weight": -1}}, "finetune.kd_weight"),
    ({"finetune": {"betas": [0.9]}}, "finetune.betas"),
    ({"finetune": {"loss": "foo"}}, "finetune.loss"),
    ({"invert": {"similarity": "dot"}}, "invert.similarity"),
    ({"invert": {"padding": "reflect"}}, "invert.padding"),
    ({"invert": {"reduction": "max"}}, "invert.reduction"),
    ({"invert": {"interpolation": "nearest"}}, "invert.interpolation"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_params_are_rejected_by_key(tmp_path, tiny_checkpoint, overrides, key):
    path = params_file(tmp_path, tiny_checkpoint, overrides)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert f"'{key}'" in str(err.value)


def test_yaml_spellings_of_inf_and_nan_are_rejected(tmp_path, tiny_checkpoint):
    """What a user types by hand (YAML 1.2 `.inf`, `.NaN`), not only what ruamel writes."""
    path = params_file(tmp_path, tiny_checkpoint, {})
    text = path.read_text()
    assert "\nlr: 0.0001\n" in f"\n{text}"
    for spelling in (".inf", "+.inf", "-.Inf", ".NaN", ".nan"):
        path.write_text(f"\n{text}".replace("\nlr: 0.0001\n", f"\nlr: {spelling}\n"))
        with pytest.raises(ParamsError, match="'lr' must be a finite number"):
            load_params(path)


def test_old_logit_scale_key_says_it_was_renamed(tmp_path, tiny_checkpoint):
    for overrides, key in [({"finetune": {"logit_scale": 3.0}}, "finetune.logit_scale"),
                           ({"recipes": {"paper": {"logit_scale": 3.0}}}, "recipes.paper.logit_scale")]:
        with pytest.raises(ParamsError) as err:
            load_params(params_file(tmp_path, tiny_checkpoint, overrides))
        assert f"'{key}'" in str(err.value) and "renamed" in str(err.value) and "temperature" in str(err.value)


def finetune_project(folder: Path, checkpoint: Path, nan_in: str | None = None, **overrides) -> Path:
    """A project with its concept files and fake inversions written (NaN in one pixel of `nan_in`)."""
    project = make_project(folder, checkpoint, **overrides)
    run_concepts(project / "captions/demo.yaml", project / "captions/generated.yaml",
                 ConceptsParams(names=tuple(DEMO_CONCEPTS)), project / "data/concepts")
    for k, name in enumerate(NOVEL):
        pixels = images(SAMPLES, seed=k)
        if name == nan_in:
            pixels[0, 1, 3, 4] = float("nan")
        save_inversion(project / "data/inverted" / name, pixels, torch.zeros(SAMPLES), {})
    return project


@pytest.mark.parametrize("lr, ok", [(1.0e-4, True), (float("inf"), False), (float("nan"), False)],
                         ids=["finite", "inf", "nan"])
def test_finetune_stage_rejects_non_finite_lr(tmp_path, tiny_checkpoint, lr, ok):
    """`ktpipe finetune`, run in-process (a subprocess spends ~10 s importing torch)."""
    project = finetune_project(tmp_path / "project", tiny_checkpoint, lr=lr)
    result = run_stage_here(project, "finetune", *FINETUNE_ARGS)
    if ok:
        assert result.returncode == 0, result.stderr
        assert (project / "models/paper").is_dir()
        return
    assert result.returncode == 2
    assert result.stderr.startswith("ktpipe: error: ") and "'lr'" in result.stderr and "finite" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / "models").exists() and not (project / "metrics").exists()


def test_finetune_stage_lr_option_reaches_the_optimizer_and_the_log(tmp_path, tiny_checkpoint, monkeypatch):
    """`ktpipe finetune --lr 3e-3` overrides params `lr` (1e-4): the optimizer steps at 3e-3 and the
    training log records it."""
    import ktpipe.transfer.finetune as finetune_module

    seen = []
    build = finetune_module.build_optimizer

    def spy(params, cfg, lr):
        optimizer = build(params, cfg, lr)
        seen.append([group["lr"] for group in optimizer.param_groups])
        return optimizer

    monkeypatch.setattr(finetune_module, "build_optimizer", spy)
    project = finetune_project(tmp_path / "project", tiny_checkpoint, recipes={"paper": {"loss": "authors"}})
    result = run_stage_here(project, "finetune", "--lr", "3e-3", *FINETUNE_ARGS)
    assert result.returncode == 0, result.stderr
    assert seen == [[pytest.approx(3e-3)]]
    log = json.loads((project / FINETUNE_ARGS[-1]).read_text())
    assert log["lr"] == pytest.approx(3e-3) and log["base_lr"] == pytest.approx(3e-3)
    assert log["lr_multiplier"] == 1.0 and len(log["log"]) >= 1


@pytest.mark.parametrize("lr", ["0", "-1e-3", "nan", "inf"])
def test_finetune_stage_rejects_a_non_positive_or_non_finite_lr_option(tmp_path, tiny_checkpoint, lr):
    project = finetune_project(tmp_path / "project", tiny_checkpoint)
    result = run_stage_here(project, "finetune", "--lr", lr, *FINETUNE_ARGS)
    assert result.returncode == 2 and "--lr must be a finite positive number" in result.stderr
    assert not (project / "models").exists() and not (project / "metrics").exists()


# --- NaN losses stop the run ----------------------------------------------------------------


def test_inversion_with_nan_weights_stops_at_step_0(nan_checkpoint):
    model = load_tiny(nan_checkpoint)
    with pytest.raises(NonFiniteError, match=r"blicket.*loss is nan at step 0\b"):
        invert_text(model, TEXT, InvertParams(steps=3, samples=2), name="blicket", progress=False)


def test_finetune_with_nan_weights_stops_at_step_0_without_touching_weights(nan_checkpoint):
    model = load_tiny(nan_checkpoint)
    before = state(model)
    with pytest.raises(NonFiniteError, match=r"'nanrecipe'.*loss is nan at step 0\b"):
        finetune(model, images(4), torch.tensor([0, 1, 0, 1]), CAPTIONS, FinetuneParams(kd_weight=1.0), 1e-3,
                 progress=False, recipe="nanrecipe")
    assert_same_state(before, model)


@pytest.mark.parametrize("pixels_mode", ["raw", "minmax_png"])
def test_finetune_on_nan_images_stops_without_touching_weights(tiny_checkpoint, pixels_mode):
    model = load_tiny(tiny_checkpoint)
    before = state(model)
    pixels = images(4)
    pixels[2, 0, 5, 5] = float("nan")
    if pixels_mode == "minmax_png":
        pixels = minmax_png(pixels)
        assert pixels[2].isnan().all() and not pixels[[0, 1, 3]].isnan().any()
    with pytest.raises(NonFiniteError, match=r"'nanpix'.*loss is nan at step 0\b"):
        finetune(model, pixels, torch.tensor([0, 1, 0, 1]), CAPTIONS, FinetuneParams(batch_size=4), 1e-3,
                 progress=False, recipe="nanpix")
    assert_same_state(before, model)


def test_run_finetune_on_nan_inversion_writes_nothing(tmp_path, tiny_checkpoint):
    project = finetune_project(tmp_path / "project", tiny_checkpoint, nan_in="dax",
                               finetune={"batch_size": 2 * SAMPLES * len(NOVEL)})
    params = load_params(project / "params.yaml")
    out_dir, log_path = project / "models/paper", project / "metrics/paper.json"
    with pytest.raises(NonFiniteError, match=r"'paper'.*loss is nan at step 0\b"):
        run_finetune(params, "paper", project / "data/concepts", project / "data/inverted", out_dir, log_path)
    assert not out_dir.exists() and not log_path.exists()
    assert not [p for p in project.rglob("*") if p.name.startswith(".")]  # no temporary folder left


# --- inversion options ----------------------------------------------------------------------


def test_mean_reduction_is_the_sum_over_n():
    gen = torch.Generator().manual_seed(0)
    sims, pixels = torch.randn(5, generator=gen), torch.rand(5, 3, 8, 8, generator=gen)
    total = inversion_loss(sims, pixels, 0.05, "sum")
    torch.testing.assert_close(inversion_loss(sims, pixels, 0.05, "mean"), total / 5)
    torch.testing.assert_close(inversion_loss(sims, pixels, 0.05), total)  # sum is the default


def test_border_padding_fills_the_moved_out_corners():
    cfg = dict(affine_p=1.0, scale_min=0.5, scale_max=0.5)
    ones = torch.ones(6, 3, SIZE, SIZE)
    zeros_out = random_affine(ones, InvertParams(padding="zeros", **cfg), torch.Generator().manual_seed(0))
    border_out = random_affine(ones, InvertParams(padding="border", **cfg), torch.Generator().manual_seed(0))
    for corner in (zeros_out[..., 0, 0], zeros_out[..., 0, -1], zeros_out[..., -1, 0], zeros_out[..., -1, -1]):
        assert torch.equal(corner, torch.zeros_like(corner))
    assert border_out.min() > 0.999 and border_out.max() < 1.001


def test_an_unaugmented_view_is_the_image_itself():
    """affine_p 0: the view is the pixels as they are (affine_grid and grid_sample must agree on
    align_corners, else the identity resamples the image slightly scaled)."""
    pixels = images(3, seed=4)
    for padding in ("zeros", "border"):
        view = random_affine(pixels, InvertParams(affine_p=0.0, padding=padding), torch.Generator().manual_seed(0))
        torch.testing.assert_close(view, pixels, rtol=0, atol=1e-5)


def test_set_trainable_freezes_everything_but_the_chosen_tower(tiny_checkpoint):
    from ktpipe.transfer.finetune import set_trainable

    model = load_tiny(tiny_checkpoint)
    trainable = set_trainable(model, "visual")
    names = {name for name, p in model.module.named_parameters() if p.requires_grad}
    assert names and all(name.startswith("visual.") for name in names)  # text tower, logit scale: frozen
    assert {id(p) for p in trainable} == {id(p) for p in model.module.parameters() if p.requires_grad}


def test_bicubic_resize_differs_from_bilinear_and_stays_in_range():
    small = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    bicubic, bilinear = to_model_size(small, SIZE, "bicubic"), to_model_size(small, SIZE, "bilinear")
    assert bicubic.shape == bilinear.shape == (2, 3, SIZE, SIZE)
    assert (bicubic - bilinear).abs().max() > 0.01
    raw = F.interpolate(small, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    assert raw.min() < 0 or raw.max() > 1  # bicubic overshoots ...
    assert bicubic.min() >= 0 and bicubic.max() <= 1  # ... and to_model_size clamps
    torch.testing.assert_close(bicubic, raw.clamp(0, 1))


def test_l2_similarity_is_minus_the_raw_embedding_distance(tiny_checkpoint):
    model = load_tiny(tiny_checkpoint)
    model.module.eval()
    views = images(3, seed=2)
    target = model.text_target(TEXT, "l2")
    with torch.no_grad():
        raw_text = model.encode_texts([TEXT], normalize=False)[0]
        raw_images = model.encode_images(views, normalize=False)
        sims = model.similarity(views, target, "l2")
    torch.testing.assert_close(target, raw_text)
    assert abs(raw_text.norm().item() - 1) > 0.05  # raw, not normalized
    expected = torch.tensor([-math.dist(raw_images[i].tolist(), raw_text.tolist()) for i in range(3)])
    torch.testing.assert_close(sims, expected, rtol=1e-5, atol=1e-5)


def test_l2_inversion_raises_the_l2_similarity(tiny_checkpoint):
    model = load_tiny(tiny_checkpoint)
    cfg = InvertParams(steps=30, samples=2, similarity="l2")
    start = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))  # invert_text's init, seed 0
    target = model.text_target(TEXT, "l2")
    with torch.no_grad():
        before = model.similarity(start, target, "l2")
    pixels, sims = invert_text(model, TEXT, cfg, seed=0, progress=False, name="blicket")
    assert (sims < 0).all() and (sims > before + 0.1).all()
    with torch.no_grad():
        torch.testing.assert_close(sims, model.similarity(pixels, target, "l2"))


def test_inversion_choices_record_the_options(tiny_checkpoint):
    model = load_tiny(tiny_checkpoint)
    cfg = InvertParams(steps=10, similarity="l2", reduction="mean", padding="border", interpolation="bicubic")
    choices = inversion_choices(cfg, model)
    assert {k: choices[k] for k in ("similarity", "reduction", "padding", "interpolation", "image_size")} == {
        "similarity": "l2", "reduction": "mean", "padding": "border", "interpolation": "bicubic", "image_size": SIZE}
    assert inversion_choices(InvertParams(), model)["padding"] == "zeros"


# --- min-max PNG pixels ---------------------------------------------------------------------


def test_minmax_png_scales_each_image_to_8_bit_0_1():
    gen = torch.Generator().manual_seed(0)
    pixels = torch.cat([torch.rand(1, 3, 8, 8, generator=gen),  # [0, 1)
                        0.2 + 0.5 * torch.rand(1, 3, 8, 8, generator=gen),  # [0.2, 0.7)
                        3 * torch.randn(1, 3, 8, 8, generator=gen)])  # raw floats outside [0, 1]
    out = minmax_png(pixels)
    assert out.shape == pixels.shape
    lows, highs = out.amin(dim=(1, 2, 3)), out.amax(dim=(1, 2, 3))
    assert (lows == 0).all()
    assert (highs >= 1 - 1 / 255 - 1e-6).all() and (highs <= 1).all()
    steps = out * 255
    assert (steps - steps.round()).abs().max() < 1e-4  # multiples of 1/255
    for i in range(3):  # each image on its own
        assert torch.equal(out[i], minmax_png(pixels[i:i + 1])[0])


def save_image_round_trip(image: torch.Tensor, path: Path) -> torch.Tensor:
    """The authors' PNG: save_image(normalize=True, scale_each=True), read back as [0, 1] floats."""
    from torchvision.utils import save_image

    save_image(image.clone(), path, normalize=True, scale_each=True)
    with Image.open(path) as png:
        return torch.from_numpy(np.asarray(png.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("seed", [0, 1])
def test_minmax_png_matches_torchvision_png(tmp_path, seed):
    image = 0.1 + 0.8 * torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    expected = save_image_round_trip(image, tmp_path / "image.png")
    torch.testing.assert_close(minmax_png(image[None])[0], expected, rtol=0, atol=1 / 255 + 1e-6)


def test_minmax_png_rounds_to_the_nearest_8_bit_level_as_torchvision(tmp_path):
    """Within one level above, but the same level almost everywhere (+0.5 then floor: rounding)."""
    image = 0.1 + 0.8 * torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    expected = save_image_round_trip(image, tmp_path / "image.png")
    same = (minmax_png(image[None])[0] * 255).round() == (expected * 255).round()
    assert same.float().mean() > 0.99


def test_minmax_png_matches_torchvision_on_a_low_contrast_image(tmp_path):
    image = 0.5 + 1e-3 * torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    expected = save_image_round_trip(image, tmp_path / "image.png")
    assert expected.max() == 1.0
    torch.testing.assert_close(minmax_png(image[None])[0], expected, rtol=0, atol=1 / 255 + 1e-6)
