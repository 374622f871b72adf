"""Zero-shot segmentation (ktpipe.eval.segmentation): the task end to end through run_evaluate on
the tiny CLIP (metrics, per-image parquet, saliency and mask PNGs at each image's size), SAM's
masks in place of the saliency mask with a tiny random-init SAM, a toy tower whose saliency is
perfect (DSC 1, a non-square image included) or inverted (DSC 0), a demo-world set rendered with
its masks, the set's prompt, and the report's table and figure. Bad input through the stage
commands is in tests/test_bad_input.py."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from ruamel.yaml import YAML

from conftest import NOVEL, read_params
from test_sam import TINY_SAM
from ktpipe.concepts import ConceptText
from ktpipe.datasets import Manifest, load_dataset, run_data
from ktpipe.describe import run_concepts
from ktpipe.errors import KtpipeError
from ktpipe.eval import run_evaluate
from ktpipe.eval import segmentation as seg
from ktpipe.eval.base import TaskInput
from ktpipe.eval.masks import EMPTY_TRUTH, keep_sam_components, mask_boxes
from ktpipe.models.base import SQUARE_RESIZE, EmbedsTexts, TakesImages, VisionFeatures, square_pixels
from ktpipe.params import (
    DatasetParams,
    EvaluateParams,
    ParamsError,
    SaliencySearchParams,
    SegmentationParams,
    load_params,
    validate_segmentation,
)

FAST = {"layer": 0, "steps": 2, "noise_samples": 2, "batch_size": 2}  # M2IB on the tiny CLIP (one vision block)

# (class, stem, suffix, (width, height), object box (x0, y0, x1, y1)): a square, a wide JPEG and a
# tall image; blicket is a novel demo concept, lantern a known one.
IMAGES = [("blicket", "a", ".png", (24, 24), (4, 6, 14, 18)), ("blicket", "b", ".jpg", (48, 32), (16, 8, 32, 24)),
          ("lantern", "c", ".png", (20, 30), (5, 10, 15, 22))]


def write_pair(root: Path, cls: str | None, stem: str, suffix: str, size: tuple[int, int],
               box: tuple[int, int, int, int]) -> None:
    """root/images/[cls/]stem+suffix (a bright block on a dark ground) and root/masks/[cls/]stem.png (0/255)."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)  # (H, W)
    mask[box[1]:box[3], box[0]:box[2]] = 255
    sub = Path(cls) if cls else Path()
    for folder in ("images", "masks"):
        (root / folder / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.repeat(mask[..., None], 3, axis=2)).save(root / "images" / sub / f"{stem}{suffix}")
    Image.fromarray(mask).save(root / "masks" / sub / f"{stem}.png")


def write_layout(root: Path, images=IMAGES) -> Path:
    for cls, stem, suffix, size, box in images:
        write_pair(root, cls, stem, suffix, size, box)
    return root


def segmentation_project(project: Path, sets: dict, **segmentation) -> tuple:
    """The tiny project with `sets` as its only evaluation sets, fast M2IB settings and the demo
    concepts' files; (params, eval dir, concepts dir) after the data stage."""
    raw = read_params(project)
    raw["evaluate"]["sets"] = sets
    raw["evaluate"]["segmentation"] = {**FAST, **segmentation}
    raw["report"] = {"target_set": next(iter(sets)), "retention_set": next(iter(sets))}
    with (project / "params.yaml").open("w") as fh:
        YAML(typ="safe", pure=True).dump(raw, fh)
    params = load_params(project / "params.yaml")
    run_concepts(project / "captions/demo.yaml", project / "captions/generated.yaml", params.concepts,
                 project / "data/concepts", world_path=project / "data/world.json")
    run_data(params, project / "data/eval", project / "data/world.json")
    return params, project / "data/eval", project / "data/concepts"


def evaluate(project: Path, params, eval_dir: Path, concepts_dir: Path,
             out: str = "metrics/eval/baseline.json") -> dict:
    return run_evaluate(params, "baseline", project / "models/baseline", eval_dir, concepts_dir, project / out)


@pytest.fixture
def shapes(tiny_project, tmp_path):
    """The tiny project with one segmentation set `shapes` (IMAGES) after the data stage."""
    root = write_layout(tmp_path / "shapes")
    return segmentation_project(tiny_project,
                                {"shapes": {"task": "segmentation", "format": "masks", "root": str(root)}})


@pytest.fixture(scope="module")
def sam_folder(tmp_path_factory) -> Path:
    """A tiny random-init SAM (tests/test_sam.py's config) saved in transformers' layout."""
    from transformers import SamConfig

    from ktpipe.models.sam import SamSegmenter

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sam") / "tiny_sam"
    SamSegmenter.from_config(SamConfig(**TINY_SAM)).save(folder)
    return folder


def png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


# --- end to end on the tiny CLIP ------------------------------------------------------------


def test_run_evaluate_writes_metrics_scores_and_pngs_at_each_images_size(tiny_project, shapes):
    params, eval_dir, concepts_dir = shapes
    result = evaluate(tiny_project, params, eval_dir, concepts_dir)
    metrics = result["metrics"]["shapes"]["segmentation"]
    assert result["tasks"] == {"shapes": "segmentation"}
    assert metrics["n_images"] == 3 and metrics["n_dsc"] == metrics["n_nsd"] == metrics["n_iou"] == 3
    assert metrics["target_n_images"] == 2 and metrics["retention_n_images"] == 1
    assert metrics["concept_blicket_n_images"] == 2 and not any(k.startswith("concept_lantern") for k in metrics)
    for prefix in ("", "target_", "retention_", "concept_blicket_"):
        for key in ("dsc", "nsd", "iou"):
            assert 0 <= metrics[prefix + key] <= 1
    assert not any(k.startswith("saliency_") for k in metrics)  # no SAM: the saliency mask is the prediction
    assert set(result["summary"]["shapes"]["segmentation"]) == {"dsc", "nsd", "iou", "target", "retention", "blicket"}

    out = tiny_project / "metrics/eval/baseline"
    rows = pd.read_parquet(out / "shapes.segmentation.parquet")
    assert list(rows.columns) == ["path", "mask", "class", "group", "dsc", "nsd", "iou", "predicted"]
    assert [Path(p).name for p in rows["path"]] == ["a.png", "b.jpg", "c.png"]
    assert [Path(p).name for p in rows["mask"]] == ["a.png", "b.png", "c.png"]
    assert list(rows["class"]) == ["blicket", "blicket", "lantern"]
    assert list(rows["group"]) == ["target", "target", "retention"]
    assert metrics["dsc"] == pytest.approx(rows["dsc"].mean())
    assert metrics["target_iou"] == pytest.approx(rows["iou"][:2].mean())
    for row, (_, _, _, (width, height), _) in zip(rows.itertuples(), IMAGES):
        mask, saliency = png(out / row.predicted), png(out / row.predicted.replace(".masks/", ".saliency/"))
        assert mask.shape == saliency.shape == (height, width)
        assert set(np.unique(mask)) <= {0, 255} and mask.any()  # k-means keeps a non-empty component
        assert saliency.dtype == np.uint8 and saliency.any()
    assert sorted(p.name for p in out.iterdir()) == ["shapes.masks", "shapes.saliency", "shapes.segmentation.parquet"]


def test_sam_refines_the_saliency_masks_boxes(tiny_project, shapes, sam_folder):
    """With SAM the predicted masks are SAM's masks for the boxes of the coarse saliency masks (the
    masks the same run without SAM predicts), cut to as many components as each coarse mask has,
    and the coarse masks' scores are kept as saliency_*."""
    from ktpipe.models.sam import SamSegmenter

    params, eval_dir, concepts_dir = shapes
    plain = evaluate(tiny_project, params, eval_dir, concepts_dir, "metrics/plain/baseline.json")
    with_sam = dataclasses.replace(params, evaluate=dataclasses.replace(
        params.evaluate, segmentation=dataclasses.replace(params.evaluate.segmentation, sam=str(sam_folder))))
    refined = evaluate(tiny_project, with_sam, eval_dir, concepts_dir, "metrics/sam/baseline.json")
    coarse, metrics = plain["metrics"]["shapes"]["segmentation"], refined["metrics"]["shapes"]["segmentation"]
    for prefix in ("", "target_", "retention_", "concept_blicket_"):
        for key in ("dsc", "nsd", "iou"):
            assert metrics[f"{prefix}saliency_{key}"] == pytest.approx(coarse[prefix + key])
            assert metrics[f"{prefix}n_saliency_{key}"] == coarse[f"{prefix}n_{key}"]

    before = pd.read_parquet(tiny_project / "metrics/plain/baseline/shapes.segmentation.parquet")
    after = pd.read_parquet(tiny_project / "metrics/sam/baseline/shapes.segmentation.parquet")
    assert list(after["saliency_dsc"]) == pytest.approx(list(before["dsc"]))
    coarse_masks = [png(tiny_project / "metrics/plain/baseline" / p) > 0 for p in before["predicted"]]
    sam_masks = [png(tiny_project / "metrics/sam/baseline" / p) > 0 for p in after["predicted"]]
    images = [Image.open(p).convert("RGB") for p in after["path"]]
    expected = [keep_sam_components(mask, rough) for mask, rough in zip(
        SamSegmenter.load(str(sam_folder)).segment(images, [mask_boxes(m) for m in coarse_masks]), coarse_masks)]
    for got, want, rough, image in zip(sam_masks, expected, coarse_masks, images):
        assert got.shape == (image.height, image.width)
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(got, rough) for got, rough in zip(sam_masks, coarse_masks))
    text = "\n".join(seg.Segmentation().report_table({"baseline": metrics}, []))
    assert "| Saliency-mask DSC |" in text and f"{100 * metrics['saliency_dsc']:.1f}%" in text


def test_a_demo_segmentation_set_is_rendered_with_masks_and_scored(tiny_project):
    params, eval_dir, concepts_dir = segmentation_project(
        tiny_project, {"shapes": {"task": "segmentation", "format": "demo", "split": "test", "subset": 11}})
    rows = pd.read_parquet(eval_dir / "shapes.parquet")
    assert len(rows) == 11 and all((eval_dir / m).is_file() for m in rows["mask"])
    assert all(m.startswith("shapes/masks/") for m in rows["mask"])  # relative to the data folder
    metrics = evaluate(tiny_project, params, eval_dir, concepts_dir)["metrics"]["shapes"]["segmentation"]
    assert metrics["n_images"] == 11 and metrics["target_n_images"] == len(NOVEL)
    assert all(metrics[f"concept_{name}_n_images"] == 1 for name in NOVEL) and 0 <= metrics["dsc"] <= 1


# --- a toy tower whose saliency is right (or exactly wrong) ----------------------------------


class BrightnessTower:
    """A toy dual encoder with `VisionFeatures`: 16 px inputs (shorter side resized, center crop, as
    every backend), a class token and a 16x16 grid of one-feature tokens, each its pixel's
    brightness (`inverted`: darkness). The image embedding is (sum of the pixel tokens, 1) and every
    text embeds as (1, 0), so gradient x input saliency is each pixel's brightness (darkness):
    bright objects on a black ground are segmented exactly at 16 px (inverted: their complement)."""

    image_size = 16
    resize_rule = SQUARE_RESIZE.format(size=16)
    vision_layers = 1

    def __init__(self, inverted: bool = False):
        self.inverted = inverted
        self.module = torch.nn.Identity()  # no weights
        self.to_pixels = square_pixels(self.image_size)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.to_pixels(image.convert("RGB"))

    def vision_token_grid(self) -> tuple[int, int, int]:
        return 1, 16, 16

    def encode_images_through(self, pixels: torch.Tensor, layer: int, edit) -> torch.Tensor:
        brightness = pixels.mean(1).flatten(1)  # (B, 256)
        brightness = 1 - brightness if self.inverted else brightness
        tokens = edit(torch.cat([torch.zeros(len(pixels), 1), brightness], 1)[..., None])  # (B, 257, 1)
        total = tokens[:, 1:, 0].sum(1)  # (B,)
        return F.normalize(torch.stack([total, torch.ones_like(total)], 1), dim=-1)  # (B, 2)

    def encode_texts(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0]]).expand(len(texts), -1)

    def logit_scale(self) -> torch.Tensor:
        return torch.tensor(100.0)


# Images whose shorter side is the model's 16 px, so no resize blurs them: a square, a wide image
# whose center crop is x 8-24, a tall one whose crop is y 4-20; each object inside the crop.
NATIVE = [(None, "square", ".png", (16, 16), (4, 4, 12, 10)), (None, "wide", ".png", (32, 16), (10, 4, 20, 12)),
          (None, "tall", ".png", (16, 24), (3, 8, 13, 16))]
# The same at 2x and 4x, and one JPEG: resized to 16 px for the model, the saliency back to each size.
SCALED = [(None, "square", ".png", (32, 32), (8, 8, 24, 20)), (None, "wide", ".jpg", (64, 32), (20, 8, 40, 24)),
          (None, "tall", ".png", (64, 96), (12, 32, 52, 64))]


def toy_input(root: Path, outputs: Path | None, **segmentation) -> TaskInput:
    spec = DatasetParams(task="segmentation", format="masks", root=str(root), classes=("object",))
    manifest = load_dataset("toy", spec, seed=0)
    cfg = SegmentationParams(**{"saliency": "gradient", "layer": 0, **segmentation})
    return TaskInput("toy", manifest, spec, [], ["a photo of a {}."], [], EvaluateParams(segmentation=cfg), outputs)


@pytest.mark.parametrize("postprocess", ["kmeans", "otsu", "threshold"])
def test_a_perfect_saliency_scores_one_and_an_inverted_one_zero(tmp_path, postprocess):
    root = write_layout(tmp_path / "toy", NATIVE)
    task = seg.Segmentation()
    assert all(isinstance(BrightnessTower(), c) for c in (TakesImages, VisionFeatures, EmbedsTexts))
    right = task.evaluate(BrightnessTower(), toy_input(root, tmp_path / "right", postprocess=postprocess)).metrics
    wrong = task.evaluate(BrightnessTower(inverted=True), toy_input(root, None, postprocess=postprocess)).metrics
    assert (right["dsc"], right["nsd"], right["iou"], right["n_dsc"]) == pytest.approx((1.0, 1.0, 1.0, 3))
    assert (wrong["dsc"], wrong["iou"]) == (0.0, 0.0)  # the background around each object in the crop
    rows = pd.read_parquet(tmp_path / "right/toy.segmentation.parquet")
    assert sorted(Path(p).stem for p in rows["path"]) == sorted(stem for _, stem, *_ in NATIVE)
    for row in rows.itertuples():
        predicted, truth = png(tmp_path / "right" / row.predicted), png(row.mask)
        assert predicted.shape == truth.shape == png(row.path).shape[:2]
        np.testing.assert_array_equal(predicted, truth)


def test_masks_of_resized_images_lie_where_their_objects_are(tmp_path):
    """Larger images (the model sees them at 16 px): the saliency map, resized back onto each image's
    center crop, still covers its object (only the resizes' blur at the edges is lost)."""
    root = write_layout(tmp_path / "toy", SCALED)
    task = seg.Segmentation()
    right = task.evaluate(BrightnessTower(), toy_input(root, tmp_path / "right", postprocess="threshold")).metrics
    wrong = task.evaluate(BrightnessTower(inverted=True), toy_input(root, None, postprocess="threshold")).metrics
    rows = pd.read_parquet(tmp_path / "right/toy.segmentation.parquet")
    assert (rows["dsc"] > 0.9).all() and right["dsc"] > 0.9 and wrong["dsc"] < 0.1
    sizes = {stem: size for _, stem, _, size, _ in SCALED}
    for row in rows.itertuples():
        width, height = sizes[Path(row.path).stem]
        assert png(tmp_path / "right" / row.predicted).shape == (height, width) == png(row.path).shape[:2]


def test_a_non_square_image_is_segmented_in_its_center_crop_only(tmp_path):
    """The 32x16 image's model input is its central 16x16 square: an object there is found at its
    place, one in the strip the crop cut off is not (the saliency is 0 there)."""
    root = tmp_path / "toy"
    write_pair(root, None, "inside", ".png", (32, 16), (8, 4, 14, 12))  # at the crop's left edge
    write_pair(root, None, "outside", ".png", (32, 16), (0, 4, 6, 12))  # in the left strip the crop drops
    task = seg.Segmentation()
    metrics = task.evaluate(BrightnessTower(), toy_input(root, tmp_path / "out", postprocess="threshold")).metrics
    rows = pd.read_parquet(tmp_path / "out/toy.segmentation.parquet")
    rows.index = [Path(p).stem for p in rows["path"]]
    assert rows.loc["inside", "dsc"] == 1.0 and metrics["n_images"] == 2
    saliency = png(tmp_path / "out" / rows.loc["inside", "predicted"].replace(".masks/", ".saliency/"))
    assert saliency.shape == (16, 32) and saliency[4:12, 8:14].all() and saliency.sum() == 255 * 6 * 8
    assert rows.loc["outside", "dsc"] == 0.0 and not png(tmp_path / "out" / rows.loc["outside", "predicted"]).any()


def test_spacing_scales_the_nsd_tolerance(tmp_path):
    """NSD counts boundary pixels within `nsd_tolerance` in the set's spacing units: a mask one
    column off is within 2 px, but not within 2 mm of 4 mm columns."""
    root = tmp_path / "toy"
    write_pair(root, None, "x", ".png", (16, 16), (4, 4, 12, 12))  # the model finds this block exactly
    shifted = np.zeros((16, 16), dtype=np.uint8)
    shifted[4:12, 5:13] = 255  # the truth: one column to the right
    Image.fromarray(shifted).save(root / "masks" / "x.png")
    scored = {}
    for spacing in ((), (1.0, 4.0)):
        data = toy_input(root, None, postprocess="threshold")
        data = dataclasses.replace(data, spec=dataclasses.replace(data.spec, spacing=spacing))
        scored[spacing] = seg.Segmentation().evaluate(BrightnessTower(), data).metrics
    assert scored[()]["nsd"] == pytest.approx(1.0) and scored[(1.0, 4.0)]["nsd"] < 1.0
    assert scored[()]["dsc"] == scored[(1.0, 4.0)]["dsc"] == pytest.approx(2 * 56 / 128)  # DSC ignores spacing


# --- MedCLIP-SAMv2's hyper-parameter search ----------------------------------------------------


class DeepTower(BrightnessTower):
    """BrightnessTower with three vision blocks, so the search has layers to pick from."""

    vision_layers = 3


BEST = (1.0, 2.0, 2)  # (beta, variance, layer): the one setting whose fake M2IB map is right


@pytest.fixture
def fake_m2ib(monkeypatch) -> list[tuple[float, float, int]]:
    """M2IB replaced by each pixel's brightness for the setting BEST and its darkness for any other
    (DSC 1 and 0 on bright objects); returns the (beta, variance, layer) of every call, in order."""
    from ktpipe.eval import saliency

    calls = []

    def fake(model, pixels, texts, cfg, seed):
        calls.append((cfg.beta, cfg.variance, cfg.layer))
        brightness = pixels.mean(1)  # (B, 16, 16): the toy tower's patch grid
        return brightness if calls[-1] == BEST else 1 - brightness

    monkeypatch.setitem(saliency.SALIENCY_METHODS, "m2ib", fake)
    return calls


def search_input(tmp_path: Path, **search) -> TaskInput:
    """The toy set `toy` (NATIVE) with the validation set `toy_val` (SCALED) searched for it."""
    search = SaliencySearchParams(**{"sets": {"toy": "toy_val"}, "beta": (0.1, 1.0), "variance": (1.0, 2.0),
                                     "layer": (0, 2), **search})
    data = toy_input(write_layout(tmp_path / "toy", NATIVE), tmp_path / "out", saliency="m2ib",
                     postprocess="threshold", hyper_opt=search)
    val_spec = dataclasses.replace(data.spec, root=str(write_layout(tmp_path / "toy_val", SCALED)))
    return dataclasses.replace(data, sets={"toy": data.manifest, "toy_val": load_dataset("toy_val", val_spec, seed=0)})


def test_hyper_opt_searches_the_grid_and_segments_with_the_best_setting(tmp_path, fake_m2ib):
    metrics = seg.Segmentation().evaluate(DeepTower(), search_input(tmp_path), progress=False).metrics
    grid = [(b, v, layer) for b in (0.1, 1.0) for v in (1.0, 2.0) for layer in (0, 2)]  # MedCLIP-SAMv2's order
    assert fake_m2ib[:len(grid)] == grid  # each setting once, on the validation images together
    assert set(fake_m2ib[len(grid):]) == {BEST}  # then the test images with the best setting only
    assert (metrics["hyper_opt_beta"], metrics["hyper_opt_variance"], metrics["hyper_opt_layer"]) == BEST
    assert metrics["hyper_opt_dsc"] > 0.9 and metrics["hyper_opt_n_images"] == 3
    scored = {k: v for k, v in metrics.items() if k.startswith("hyper_opt_dsc_")}
    assert len(scored) == len(grid) and scored.pop("hyper_opt_dsc_beta1_variance2_layer2") == metrics["hyper_opt_dsc"]
    assert all(v < 0.1 for v in scored.values()) and "hyper_opt_dsc_beta0p1_variance1_layer0" in scored
    assert (metrics["dsc"], metrics["n_dsc"]) == (1.0, 3)  # the test set segmented perfectly: BEST applied


def test_hyper_opt_takes_the_first_of_equal_scores_and_leaves_other_sets_alone(tmp_path, fake_m2ib):
    data = search_input(tmp_path, beta=(0.1, 0.5), variance=(1.0,), layer=(0,))  # BEST not in the grid
    metrics = seg.Segmentation().evaluate(DeepTower(), data, progress=False).metrics
    assert metrics["hyper_opt_dsc_beta0p1_variance1_layer0"] == metrics["hyper_opt_dsc_beta0p5_variance1_layer0"]
    assert metrics["hyper_opt_beta"] == 0.1  # the same map for both: the first in grid order wins
    val = dataclasses.replace(data, set_name="toy_val", manifest=data.sets["toy_val"])
    fake_m2ib.clear()
    metrics = seg.Segmentation().evaluate(DeepTower(), val, progress=False).metrics
    assert not any(k.startswith("hyper_opt") for k in metrics) and set(fake_m2ib) == {(0.1, 1.0, 0)}  # fixed setting


def test_hyper_opt_draws_one_image_per_seed_among_those_with_a_mask(tmp_path):
    import random

    root = write_layout(tmp_path / "val", NATIVE + [(None, f"n{i}", ".png", (16, 16), (4, 4, 12, 10)) for i in range(5)])
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "masks" / "square.png")  # an empty mask: never drawn
    manifest = load_dataset("val", DatasetParams(task="segmentation", format="masks", root=str(root),
                                                 classes=("object",)), seed=0)
    pool = [i for i, r in enumerate(manifest.records) if Path(r.path).stem != "square"]
    assert seg.search_images(manifest, None) == pool
    assert seg.search_images(manifest, 3) == [random.Random(i).sample(pool, 1)[0] for i in range(3)]


def test_hyper_opt_names_unknown_sets_and_bad_grids(tmp_path):
    data = search_input(tmp_path)
    with pytest.raises(ParamsError, match=r"hyper_opt\.sets' names \['toy_val'\]"):
        seg.Segmentation().evaluate(DeepTower(), dataclasses.replace(data, sets={"toy": data.manifest}))
    with pytest.raises(ParamsError, match="blocks: use 0 to 2"):  # every searched layer checked up front
        seg.Segmentation().evaluate(DeepTower(), search_input(tmp_path / "deep", layer=(2, 3)))
    search = data.params.segmentation.hyper_opt
    for bad, message in [({"saliency": "gradient"}, "searches M2IB"),
                         ({"hyper_opt": dataclasses.replace(search, beta=())}, r"hyper_opt\.beta' must list"),
                         ({"hyper_opt": dataclasses.replace(search, sets={})}, r"hyper_opt\.sets' must map"),
                         ({"hyper_opt": dataclasses.replace(search, draws=0)}, r"hyper_opt\.draws"),
                         ({"hyper_opt": dataclasses.replace(search, threshold=1.0)}, r"hyper_opt\.threshold")]:
        with pytest.raises(ParamsError, match=message):
            validate_segmentation(dataclasses.replace(data.params.segmentation, **bad))


def test_hyper_opt_through_run_evaluate_records_the_search_in_the_metrics_json(tiny_project, tmp_path):
    """The tiny CLIP with real M2IB: the searched set's metrics hold the choice and the grid's
    scores, its validation set (evaluated too) holds none, and the params record the grid."""
    sets = {"shapes": {"task": "segmentation", "format": "masks", "root": str(write_layout(tmp_path / "shapes"))},
            "shapes_val": {"task": "segmentation", "format": "masks", "root": str(write_layout(tmp_path / "val"))}}
    search = {"sets": {"shapes": "shapes_val"}, "beta": [0.1, 2.0], "variance": [1.0], "layer": [0], "draws": 2}
    params, eval_dir, concepts_dir = segmentation_project(tiny_project, sets, hyper_opt=search)
    result = evaluate(tiny_project, params, eval_dir, concepts_dir)
    found = result["metrics"]["shapes"]["segmentation"]
    assert found["hyper_opt_beta"] in (0.1, 2.0) and found["hyper_opt_layer"] == 0 and found["hyper_opt_n_images"] == 2
    grid = [found["hyper_opt_dsc_beta0p1_variance1_layer0"], found["hyper_opt_dsc_beta2_variance1_layer0"]]
    assert found["hyper_opt_dsc"] == max(grid) and all(0 <= v <= 1 for v in grid)
    assert not any(k.startswith("hyper_opt") for k in result["metrics"]["shapes_val"]["segmentation"])
    assert result["params"]["evaluate"]["segmentation"]["hyper_opt"]["beta"] == (0.1, 2.0)  # as asdict gives it


# --- prompts ------------------------------------------------------------------------------------


def test_the_sets_prompt_overrides_the_templates():
    manifest = Manifest("scans", ("lung_nodules", "other"), ())
    spec = DatasetParams(task="segmentation", format="masks", root="x", prompt="A chest CT showing nodules")
    concepts = [ConceptText("lung_nodules", "round spots")]
    assert seg.set_prompts(manifest, spec, concepts, ["a photo of {}."]) == [["A chest CT showing nodules"]] * 2
    with pytest.raises(KtpipeError, match=r"'evaluate\.sets\.scans\.prompt' is empty"):
        seg.set_prompts(manifest, dataclasses.replace(spec, prompt="  "), concepts, ["{}"])


def test_without_a_prompt_the_templates_go_over_each_classs_name():
    manifest = Manifest("scans", ("Lung-Nodules", "brain_tumor", "kidney"), ())
    spec = DatasetParams(task="segmentation", format="masks", root="x")
    concepts = [ConceptText("lung_nodules", "round spots", aliases=("pulmonary nodule",)),
                ConceptText("brain_tumor", "a bright mass", prompt="an MRI of a glioma")]
    templates = ["a scan of {}.", "{}"]
    assert seg.set_prompts(manifest, spec, concepts, templates) == [
        ["a scan of lung nodules.", "lung nodules", "a scan of pulmonary nodule.", "pulmonary nodule"],  # name, alias
        ["an MRI of a glioma"],  # the concept's prompt override
        ["a scan of kidney.", "kidney"]]  # no concept: the class name as written


# --- the report --------------------------------------------------------------------------------


def scores(paths: list[str], dsc: list[float], classes: list[str] | None = None) -> pd.DataFrame:
    return pd.DataFrame({"path": paths, "dsc": dsc, "class": classes or ["lantern"] * len(paths)})


def test_improved_images_are_the_largest_rises_first_rises_only():
    paths = [f"{i}.png" for i in range(6)]
    before = scores(paths, [0.5, 0.125, np.nan, 0.875, 0.25, 0.625])
    after = scores(paths, [0.75, 0.875, 0.75, 0.875, 0.5, 0.375])  # rises 0.25, 0.75, -, 0, 0.25, -0.25
    assert seg.improved_images(before, after, 5) == [1, 0, 4]  # equal rises in image order; no NaN, 0 or fall
    assert seg.improved_images(before, after, 2) == [1, 0]
    assert seg.improved_images(after, before, 5) == [5]
    with pytest.raises(KtpipeError, match="list different images"):
        seg.improved_images(before, scores(paths[::-1], [0.0] * 6), 3)


def test_improved_images_show_novel_concepts_first():
    """A novel concept's image comes before a known one's, whatever the rises; rises only still."""
    paths = [f"{i}.png" for i in range(5)]
    classes = ["lantern", "Blicket", "lantern", "dax", "blicket"]
    before = scores(paths, [0.0, 0.5, 0.0, 0.5, 0.5], classes)
    after = scores(paths, [0.9, 0.6, 0.8, 0.4, 0.75], classes)  # rises .9, .1, .8, -.1, .25
    assert seg.improved_images(before, after, 3, frozenset({"blicket", "dax"})) == [4, 1, 0]
    assert seg.improved_images(before, after, 3) == [0, 2, 4]


def test_report_table_rows_per_group_and_model():
    concepts = [ConceptText("blicket", "a ring"), ConceptText("dax", "a triangle"),
                ConceptText("lantern", "a hexagon", role="known")]
    base = {"dsc": 0.1, "nsd": 0.2, "iou": 0.05, "n_images": 5.0, "target_dsc": 0.15, "target_nsd": 0.25,
            "target_iou": 0.1, "target_n_images": 3.0, "concept_blicket_dsc": 0.2, "concept_blicket_nsd": 0.3,
            "concept_blicket_iou": 0.12, "concept_blicket_n_images": 3.0, "retention_dsc": float("nan"),
            "retention_nsd": 0.4, "retention_iou": 0.3, "retention_n_images": 2.0}
    paper = {**base, "dsc": 0.4567}
    lines = seg.Segmentation().report_table({"baseline": base, "paper": paper}, concepts)
    assert lines[:2] == ["| Images | Model | DSC | NSD | IoU |", "|---|---|---|---|---|"]
    rows = [line for line in lines[2:] if line.startswith("| ")]
    groups = ("all (5)", "target (3)", "blicket (3)", "retention (2)")  # dax and lantern: no images
    assert [r.split(" | ")[:2] for r in rows] == [[f"| {g}", m] for g in groups for m in ("baseline", "paper")]
    assert rows[1] == "| all (5) | paper | 45.7% | 20.0% | 5.0% |"
    assert rows[6] == "| retention (2) | baseline | - | 40.0% | 30.0% |"  # NaN: no image scored
    assert EMPTY_TRUTH in lines[-1] and lines[-2] == ""


def test_report_items_draw_the_figure_only_when_some_dsc_rose(tmp_path):
    root = write_layout(tmp_path / "toy", NATIVE)
    task = seg.Segmentation()
    folders = {}
    for name, inverted in (("baseline", True), ("paper", False), ("worse", True)):
        folders[name] = tmp_path / "metrics" / name
        folders[name].mkdir(parents=True)
        task.evaluate(BrightnessTower(inverted), toy_input(root, folders[name], postprocess="threshold"))
    report = tmp_path / "reports"
    lines = task.report_items("toy", folders, [], report)
    figure = report / "figures/toy_paper_segmentation.png"
    assert figure.is_file() and png(figure).ndim == 3
    assert "![toy paper](figures/toy_paper_segmentation.png)" in lines
    assert ("Masks whose DSC rose most from `baseline` to `paper` (novel concepts first; image, ground truth, "
            "before, after; of 3 images):") in lines
    assert "No image's DSC rose from `baseline` to `worse`." in lines
    assert not (report / "figures/toy_worse_segmentation.png").exists()
    assert len(list((report / "figures").iterdir())) == 1


def test_report_items_name_the_missing_scores_file(tmp_path):
    from ktpipe.errors import InputMissingError

    with pytest.raises(InputMissingError, match=r"toy\.segmentation\.parquet.*rerun the evaluate stage"):
        seg.read_scores(tmp_path, "toy")
