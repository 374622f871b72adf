"""Saliency post-processing, SAM box prompts, MONAI segmentation scores and the saliency-to-image
geometry, on hand-made masks whose scores are worked out by hand."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from torchvision.transforms import v2 as T

from ktpipe.errors import KtpipeError
from ktpipe.eval.masks import (
    METHODS,
    crop_placement,
    image_scores,
    keep_sam_components,
    mask_boxes,
    mean_scores,
    resize_saliency_to_image,
    saliency_to_mask,
    segmentation_scores,
)


def rectangle(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


def close(value: float, exact: Fraction) -> bool:
    return value == pytest.approx(float(exact), rel=1e-6)


# ---------------------------------------------------------------- DSC and IoU

def test_dsc_and_iou_of_overlapping_rectangles():
    a = rectangle((16, 16), slice(0, 4), slice(0, 6))  # 24 pixels
    b = rectangle((16, 16), slice(2, 6), slice(3, 9))  # 24 pixels, overlap rows 2-3 x cols 3-5: 6
    overlap, union = 6, 24 + 24 - 6
    scores = image_scores(b, a)
    assert close(scores["dsc"], Fraction(2 * overlap, 24 + 24))  # 1/4
    assert close(scores["iou"], Fraction(overlap, union))  # 1/7


def test_batched_scores_match_per_image_and_accept_tensors():
    shape = (12, 12)
    truth = np.stack([rectangle(shape, slice(1, 5), slice(1, 5)), rectangle(shape, slice(0, 12), slice(0, 6))])
    pred = np.stack([rectangle(shape, slice(1, 5), slice(3, 7)), rectangle(shape, slice(0, 12), slice(0, 6))])
    batched = segmentation_scores(torch.from_numpy(pred), torch.from_numpy(truth))
    assert batched["dsc"].shape == (2,)
    for i in range(2):
        single = image_scores(pred[i], truth[i])
        assert all(batched[m][i] == pytest.approx(single[m]) for m in single)
    assert close(batched["dsc"][0], Fraction(2 * 8, 16 + 16)) and close(batched["iou"][0], Fraction(8, 24))
    assert batched["dsc"][1] == 1 and batched["iou"][1] == 1 and batched["nsd"][1] == 1


def test_scores_reject_masks_of_different_shapes():
    with pytest.raises(KtpipeError, match="differ in shape"):
        segmentation_scores(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 5), bool))


# ---------------------------------------------------------------- NSD tolerance and spacing

SQUARE = rectangle((32, 32), slice(10, 20), slice(10, 20))
SHIFTED = rectangle((32, 32), slice(10, 20), slice(12, 22))  # 2 px to the right


def test_nsd_covers_a_two_pixel_shift_at_tolerance_two():
    assert image_scores(SHIFTED, SQUARE, tolerance=2.0)["nsd"] == 1
    assert image_scores(SHIFTED, SQUARE, tolerance=3.0)["nsd"] == 1


def test_nsd_misses_a_two_pixel_shift_at_tolerance_one():
    assert image_scores(SHIFTED, SQUARE, tolerance=1.0)["nsd"] < 1
    assert image_scores(SHIFTED, SQUARE, tolerance=1.9)["nsd"] < 1


def test_nsd_tolerance_is_in_spacing_units():
    half = image_scores(SHIFTED, SQUARE, spacing=(0.5, 0.5), tolerance=1.0)["nsd"]
    assert half == 1  # 2 px of 0.5 mm: 1 mm, within a 1 mm tolerance
    assert image_scores(SHIFTED, SQUARE, spacing=(0.5,), tolerance=1.0)["nsd"] == 1  # one value: both axes
    # the shift runs along columns: only the column spacing matters for the shifted edges
    assert image_scores(SHIFTED, SQUARE, spacing=(1.0, 0.5), tolerance=1.0)["nsd"] == 1
    assert image_scores(SHIFTED, SQUARE, spacing=(0.5, 1.0), tolerance=1.0)["nsd"] < 1
    assert image_scores(SHIFTED, SQUARE, spacing=(), tolerance=1.0)["nsd"] < 1  # empty: pixels


def test_spacing_of_three_values_is_an_error():
    with pytest.raises(KtpipeError, match="rows, columns"):
        image_scores(SQUARE, SQUARE, spacing=(1.0, 1.0, 1.0))


# ---------------------------------------------------------------- empty masks

def test_empty_truth_scores_zero_against_a_prediction_and_nothing_against_an_empty_one():
    """As MedCLIP-SAMv2's evaluation/eval.py: an empty truth with a predicted blob scores 0; an empty
    truth with an empty prediction has no score there (its assert stops it), so NaN here."""
    empty = np.zeros((8, 8), dtype=bool)
    blob = rectangle((8, 8), slice(2, 5), slice(2, 5))
    assert image_scores(blob, empty) == {"dsc": 0.0, "nsd": 0.0, "iou": 0.0}
    scores = image_scores(empty, empty)
    assert all(np.isnan(scores[m]) for m in ("dsc", "nsd", "iou")), scores
    batch = segmentation_scores(np.stack([empty, blob, blob]), np.stack([empty, empty, blob]))
    for name in ("dsc", "nsd", "iou"):  # batched: the same per image
        assert np.isnan(batch[name][0]) and list(batch[name][1:]) == [0.0, 1.0]


def test_empty_prediction_of_a_present_class_scores_zero():
    scores = image_scores(np.zeros((8, 8), bool), rectangle((8, 8), slice(2, 5), slice(2, 5)))
    assert scores == {"dsc": 0.0, "nsd": 0.0, "iou": 0.0}


def test_mean_scores_skip_nan_and_count_images():
    means = mean_scores({"dsc": np.array([0.5, np.nan, 1.0]), "iou": [np.nan, np.nan]})
    assert means["dsc"] == pytest.approx(0.75) and means["n_dsc"] == 2
    assert np.isnan(means["iou"]) and means["n_iou"] == 0


# ---------------------------------------------------------------- saliency -> mask

def bimodal_map(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noisy map: low background, a large bright square and a small bright blob."""
    rng = np.random.default_rng(seed)
    saliency = 0.1 + 0.05 * rng.random((40, 40))
    big, small = rectangle((40, 40), slice(5, 20), slice(5, 20)), rectangle((40, 40), slice(30, 34), slice(30, 34))
    saliency[big | small] = 0.8 + 0.05 * rng.random(int((big | small).sum()))
    return saliency, big, small


@pytest.mark.parametrize("method", METHODS)
def test_each_method_finds_the_bright_regions(method):
    saliency, big, small = bimodal_map()
    assert np.array_equal(saliency_to_mask(saliency, method, threshold=0.5, components=2), big | small)


@pytest.mark.parametrize("method", METHODS)
def test_components_keep_the_largest(method):
    saliency, big, _ = bimodal_map()
    assert np.array_equal(saliency_to_mask(saliency, method, threshold=0.5, components=1), big)


def test_threshold_is_relative_to_the_map_range():
    saliency, big, small = bimodal_map()
    scaled_up = 10 * saliency + 3  # same map, other range: same mask
    assert np.array_equal(saliency_to_mask(scaled_up, "threshold", 0.5, 2), big | small)
    assert saliency_to_mask(saliency, "threshold", 0.99, 2).sum() < (big | small).sum()


@pytest.mark.parametrize("method", METHODS)
def test_constant_map_gives_an_empty_mask(method):
    mask = saliency_to_mask(np.full((9, 7), 0.3), method, 0.5, 1)
    assert mask.shape == (9, 7) and mask.dtype == bool and not mask.any()


def test_kmeans_is_deterministic():
    saliency = np.random.default_rng(3).random((30, 30))
    assert np.array_equal(saliency_to_mask(saliency, "kmeans", components=3),
                          saliency_to_mask(saliency, "kmeans", components=3))


def test_unknown_method_and_zero_components_are_errors():
    saliency, _, _ = bimodal_map()
    with pytest.raises(KtpipeError, match="unknown saliency post-processing"):
        saliency_to_mask(saliency, "crf")
    with pytest.raises(KtpipeError, match="at least one"):
        saliency_to_mask(saliency, "otsu", components=0)


# ---------------------------------------------------------------- boxes

def test_boxes_of_two_blobs_largest_first_with_exclusive_ends():
    mask = rectangle((16, 16), slice(12, 13), slice(14, 15)) | rectangle((16, 16), slice(2, 6), slice(3, 10))
    assert mask_boxes(mask) == [(3, 2, 10, 6), (14, 12, 15, 13)]


def test_diagonal_pixels_form_one_component_and_empty_mask_has_no_box():
    mask = np.eye(5, dtype=bool)  # 8-connected: one component
    assert mask_boxes(mask) == [(0, 0, 5, 5)]
    assert mask_boxes(np.zeros((4, 4), bool)) == []


# ---------------------------------------------------------------- SAM's mask cut to the coarse mask's count

def test_sam_mask_keeps_as_many_largest_components_as_the_coarse_mask_has():
    """MedCLIP-SAMv2's write_mask_to_folder: SAM's mask keeps its K largest 8-connected blobs, K the
    coarse mask's blob count. SAM here finds a 12-pixel, a 6-pixel (two diagonal 3-pixel runs: one
    8-connected blob) and a 2-pixel blob."""
    sam = np.zeros((10, 12), dtype=bool)
    sam[0:3, 0:4] = True  # 12 pixels
    sam[5, 5:8] = sam[6, 8:11] = True  # 6 pixels, touching at a corner
    sam[9, 0:2] = True  # 2 pixels
    one = rectangle((10, 12), slice(1, 2), slice(1, 2))
    two = one | rectangle((10, 12), slice(8, 9), slice(8, 10))
    expected_two = sam.copy()
    expected_two[9, 0:2] = False
    assert np.array_equal(keep_sam_components(sam, one), rectangle((10, 12), slice(0, 3), slice(0, 4)))
    assert np.array_equal(keep_sam_components(sam, two), expected_two)
    four = two | rectangle((10, 12), slice(4, 5), slice(0, 1)) | rectangle((10, 12), slice(0, 1), slice(11, 12))
    assert np.array_equal(keep_sam_components(sam, four), sam)  # more coarse blobs than SAM's: all kept
    assert not keep_sam_components(sam, np.zeros_like(sam)).any()  # no coarse blob, no box, nothing kept


# ---------------------------------------------------------------- saliency back onto the image

def test_square_image_is_a_plain_resize():
    saliency = torch.rand(16, 16)
    out = resize_saliency_to_image(saliency, 40, 40)
    expected = torch.nn.functional.interpolate(saliency[None, None], size=(40, 40), mode="bilinear")[0, 0]
    assert out.shape == (40, 40) and np.allclose(out, expected.numpy())


def test_wide_image_has_zero_left_and_right_quarters():
    out = resize_saliency_to_image(torch.ones(224, 224), 200, 100)  # (100, 200)
    assert out.shape == (100, 200)
    assert not out[:, :50].any() and not out[:, 150:].any() and np.allclose(out[:, 50:150], 1)


def test_tall_image_has_zero_top_and_bottom():
    out = resize_saliency_to_image(torch.ones(16, 16), 30, 90)  # (90, 30)
    assert not out[:30].any() and not out[60:].any() and np.allclose(out[30:60], 1)


@pytest.mark.parametrize(("width", "height"), [(200, 100), (301, 100), (100, 257), (123, 100)])
def test_crop_placement_matches_torchvision(width, height):
    """The preprocess's crop, found by running it on a coordinate ramp, starts where ours does."""
    size = 224
    columns = torch.arange(width, dtype=torch.float32).expand(1, height, width)
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(1, height, width)
    preprocess = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                            T.CenterCrop(size)])
    first_column, first_row = preprocess(columns)[0, 0, 0].item(), preprocess(rows)[0, 0, 0].item()
    last_column, last_row = preprocess(columns)[0, -1, -1].item(), preprocess(rows)[0, -1, -1].item()
    left, top, side = crop_placement(width, height, size)
    assert side == min(width, height)
    assert abs(first_column - left) <= 1 and abs(last_column - (left + side - 1)) <= 1
    assert abs(first_row - top) <= 1 and abs(last_row - (top + side - 1)) <= 1


def test_non_square_saliency_is_an_error():
    with pytest.raises(KtpipeError, match="square"):
        resize_saliency_to_image(torch.ones(4, 5), 10, 10)
