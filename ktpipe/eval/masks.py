"""Saliency maps to masks, masks to SAM box prompts, and segmentation scores (DSC, NSD, IoU).

Zero-shot segmentation as MedCLIP-SAMv2 does it: a text-prompted saliency map (H, W) becomes a
coarse binary mask (`saliency_to_mask`), whose connected components give SAM one box prompt each
(`mask_boxes`); predicted masks are scored against the truth with MONAI (`segmentation_scores`).

Where this differs from MedCLIP-SAMv2's scripts (postprocessing/postprocess_saliency_maps.py,
segment-anything/prompt_sam.py, evaluation/eval.py in HealthX-Lab/MedCLIP-SAMv2):

- Saliency geometry: MedCLIP-SAMv2 stretches the model's square map over the whole image
  (cv2 nearest resize to (w, h)); `resize_saliency_to_image` undoes the preprocess instead
  (shorter side resized, center crop), so a non-square image gets the map over its center square
  only and zeros where the model never looked.
- Values: MedCLIP-SAMv2 stores the map as an 8-bit PNG and thresholds value/255 as it is (default
  0.3); here the float map is min-max scaled first, so `threshold` is relative to its range.
- k-means: MedCLIP-SAMv2 runs scikit-learn's KMeans (k=2, k-means++, random_state=10) on the 8-bit
  map nearest-resized to 256x256, then nearest-resizes the labels back; here scipy's `kmeans2` runs
  on the full-resolution float values from centres at the map's minimum and maximum (no
  randomness). Both take the cluster with the higher centre as foreground.
- Otsu (`skimage.filters.threshold_otsu`) is an addition; MedCLIP-SAMv2's third option is a dense
  CRF (pydensecrf), which is not offered here.
- Components: both keep the K largest 8-connected components. MedCLIP-SAMv2 keeps every component
  whose size is among the K largest sizes (ties can keep more than K); MONAI keeps exactly K.
- Boxes: MedCLIP-SAMv2 by default draws one box around all contours (one box per contour with
  --multicontour) and clips x1, y1 to w-1, h-1; its branch for an empty mask (a whole-image box)
  returns two values where three are unpacked, so an empty coarse mask stops its script.
  `mask_boxes` gives one box per component with exclusive ends and no box for an empty mask
  (SAM then predicts nothing).
- After SAM: both keep the K largest connected components of SAM's mask, K the number of the
  coarse mask's components (`keep_sam_components`; MedCLIP-SAMv2's write_mask_to_folder in
  prompt_sam.py, with the tie rule of the component filter above).
- Scores: MedCLIP-SAMv2 hand-codes DSC and IoU and uses DeepMind's surface-distance NSD at 2 px
  on 1-pixel spacing, which weighs each boundary element by its surfel area; MONAI's NSD
  (compute_surface_dice, use_subvoxels=False as here) counts boundary pixels instead, in the
  set's pixel spacing, so the two differ a little on the same masks. Empty masks count as
  MedCLIP-SAMv2's evaluation/eval.py counts them (`EMPTY_TRUTH`): an empty truth with a non-empty
  prediction scores 0; its branch giving 1 to an empty truth and prediction is never reached (an
  assert stops the script first), so here that image has no score.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
# monai, scipy and skimage are imported where used: the report, which reads this module's
# constants, starts without them (5 s of imports in its stage process).

import numpy as np
import torch

from ktpipe.errors import KtpipeError

METHODS = ("threshold", "otsu", "kmeans")  # saliency -> mask rules (params segmentation.postprocess)
METRICS = ("dsc", "nsd", "iou")  # per-image scores, in report order
KMEANS_ITERATIONS = 20  # Lloyd iterations of the 2-cluster k-means on 1-D values (converges in a few)
CONNECTIVITY = 2  # 8-connected components in 2-D (skimage's full connectivity; cv2's default too)
EMPTY_TRUTH: str = (  # how images whose truth mask is empty count (README quotes this)
    "An image whose truth mask is empty scores 0 (DSC, IoU and NSD) when its predicted mask is not empty, "
    "as MedCLIP-SAMv2's evaluation/eval.py scores it; when both are empty it has no score (NaN), as "
    "eval.py has none either: its assert that a mask holds a label stops it before the branch that would "
    "give 1. A set's mean skips NaN images, and n_<metric> says how many images it averaged."
)

EMPTY_MASK_WARNING = r"the (ground truth|prediction) of class .* is all 0"  # MONAI's, per empty mask
MONAI_INTERNAL_WARNING = ".*get_mask_edges:always_return_as_numpy"  # MONAI 1.5+ warns about its own call

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, x1 and y1 exclusive


def scale_saliency(saliency: np.ndarray) -> np.ndarray | None:
    """The map min-max scaled to [0, 1]; None for a constant map, which has no foreground."""
    saliency = np.asarray(saliency, dtype=np.float64)  # (H, W)
    low, high = float(saliency.min()), float(saliency.max())
    if not high > low:
        return None
    return (saliency - low) / (high - low)


def kmeans_foreground(scaled: np.ndarray) -> np.ndarray:
    """Pixels of the 2-means cluster with the higher centre, started at the map's extremes."""
    from scipy.cluster.vq import kmeans2

    values = scaled.reshape(-1, 1)  # (H*W, 1)
    start = np.array([[0.0], [1.0]])  # the scaled map's minimum and maximum: deterministic, never empty
    centres, labels = kmeans2(values, start, iter=KMEANS_ITERATIONS, minit="matrix", missing="raise")
    return (labels == int(np.argmax(centres[:, 0]))).reshape(scaled.shape)


def threshold_saliency(scaled: np.ndarray, method: str, threshold: float) -> np.ndarray:
    """Foreground of a [0, 1] map by one of METHODS, before the component filter."""
    from skimage.filters import threshold_otsu

    if method == "threshold":
        return scaled > threshold
    if method == "otsu":
        return scaled > threshold_otsu(scaled)
    if method == "kmeans":
        return kmeans_foreground(scaled)
    raise KtpipeError(f"unknown saliency post-processing {method!r}; known: {list(METHODS)}")


def saliency_to_mask(saliency: np.ndarray, method: str = "kmeans", threshold: float = 0.5,
                     components: int = 1) -> np.ndarray:
    """A saliency map (H, W) as a binary mask (H, W) of its `components` largest 8-connected
    foreground regions (MONAI's largest-component filter, on skimage).

    The map is min-max scaled first; then 'threshold' keeps values above `threshold`, 'otsu'
    those above Otsu's threshold, 'kmeans' the higher of two k-means clusters. A constant map
    gives an empty mask. See the module docstring for how this differs from MedCLIP-SAMv2."""
    from monai.transforms.utils import get_largest_connected_component_mask

    if components < 1:
        raise KtpipeError(f"segmentation keeps at least one connected component, got components={components}")
    scaled = scale_saliency(saliency)
    if scaled is None:
        return np.zeros(np.shape(saliency), dtype=bool)
    foreground = threshold_saliency(scaled, method, threshold)  # (H, W) bool
    kept = get_largest_connected_component_mask(foreground, connectivity=CONNECTIVITY, num_components=components)
    return np.asarray(kept, dtype=bool)


def keep_sam_components(sam_mask: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """SAM's mask (H, W) cut to its K largest 8-connected components, K the number of components
    of the coarse mask (H, W) whose boxes prompted it: MedCLIP-SAMv2's filter after SAM
    (prompt_sam.py, write_mask_to_folder), so SAM cannot add blobs the saliency did not find.
    An empty coarse mask keeps nothing."""
    from monai.transforms.utils import get_largest_connected_component_mask
    from skimage.measure import label

    count = int(label(np.asarray(coarse, dtype=bool), connectivity=CONNECTIVITY).max())
    if count == 0:
        return np.zeros(np.shape(sam_mask), dtype=bool)
    kept = get_largest_connected_component_mask(np.asarray(sam_mask, dtype=bool), connectivity=CONNECTIVITY,
                                                num_components=count)
    return np.asarray(kept, dtype=bool)


def mask_boxes(mask: np.ndarray) -> list[Box]:
    """One (x0, y0, x1, y1) box per 8-connected component of `mask` (H, W), largest first (ties
    in raster order of the components' first pixels).

    Pixel coordinates, x along columns and y along rows, with exclusive ends as in COCO and
    cv2.boundingRect: a one-pixel component at (row 3, column 5) gives (5, 3, 6, 4), the box
    that covers the pixel's square. SAM takes XYXY boxes in the input image's pixel
    coordinates. An empty mask has no box."""
    from skimage.measure import label, regionprops

    regions = regionprops(label(np.asarray(mask, dtype=bool), connectivity=CONNECTIVITY))
    regions = sorted(regions, key=lambda r: -r.area)  # stable: equal areas keep label order
    return [(int(r.bbox[1]), int(r.bbox[0]), int(r.bbox[3]), int(r.bbox[2])) for r in regions]


def pixel_spacing(spacing: Sequence[float] | None) -> tuple[float, float] | None:
    """(rows, columns) pixel size from a set's spacing: empty or None is 1 pixel (None), one
    value is both."""
    if not spacing:
        return None
    if len(spacing) == 1:
        return (float(spacing[0]), float(spacing[0]))
    if len(spacing) == 2:
        return (float(spacing[0]), float(spacing[1]))
    raise KtpipeError(f"pixel spacing is one value or (rows, columns), got {list(spacing)}")


def as_channel_batch(masks: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> torch.Tensor:
    """Masks (N, H, W) as MONAI's single-channel batch (N, 1, H, W) of floats 0/1."""
    if isinstance(masks, torch.Tensor):
        stacked = masks.detach().cpu().bool()
    else:
        stacked = torch.from_numpy(np.asarray(masks, dtype=bool))  # a list of same-size masks stacks too
    if stacked.ndim != 3:
        raise KtpipeError(f"masks must be (N, H, W), got shape {tuple(stacked.shape)}")
    return stacked[:, None].float()


def surface_dice(y_pred: torch.Tensor, y: torch.Tensor, spacing: Sequence[float] | None,
                 tolerance: float) -> torch.Tensor:
    """MONAI's NSD (N, 1) of single-channel batches (N, 1, H, W): the share of both masks' boundary
    pixels within `tolerance` of the other's boundary; 0 where only the truth or only the
    prediction is empty, NaN where both are."""
    from monai.metrics import SurfaceDiceMetric

    with warnings.catch_warnings():  # empty masks are expected and scored as EMPTY_TRUTH says
        warnings.filterwarnings("ignore", message=EMPTY_MASK_WARNING)
        warnings.filterwarnings("ignore", message=MONAI_INTERNAL_WARNING, category=FutureWarning)
        metric = SurfaceDiceMetric(class_thresholds=[float(tolerance)], include_background=True, reduction="none")
        nsd = metric(y_pred, y, spacing=pixel_spacing(spacing))  # (N, 1)
    nsd[both_empty(y_pred, y)] = float("nan")  # MONAI's NaN already; set here so all three metrics agree
    return nsd


def both_empty(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) whether an image's truth and prediction are both empty (no score, `EMPTY_TRUTH`)."""
    return (y.flatten(1).sum(1) == 0) & (y_pred.flatten(1).sum(1) == 0)


def segmentation_scores(predicted: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor,
                        spacing: Sequence[float] | None = None, tolerance: float = 2.0) -> dict[str, np.ndarray]:
    """Per-image DSC, NSD and IoU (each (N,)) of same-size binary masks (N, H, W), with MONAI.

    One foreground channel with include_background=True, so each score is that of the mask
    itself (no background channel to inflate it). NSD counts boundary pixels (not surfel areas)
    within `tolerance` of the other mask's boundary, in `spacing` units ((rows, columns), or one
    value for both; None or empty: pixels). An empty truth scores 0 against a non-empty prediction
    and NaN against an empty one, as `EMPTY_TRUTH` says. Masks of different sizes: call once per
    image (`image_scores`)."""
    from monai.metrics import DiceMetric, MeanIoU

    y_pred, y = as_channel_batch(predicted), as_channel_batch(truth)  # (N, 1, H, W)
    if y_pred.shape != y.shape:
        raise KtpipeError(f"predicted masks {tuple(y_pred[:, 0].shape)} and truth {tuple(y[:, 0].shape)} "
                          "differ in shape")
    unscored = both_empty(y_pred, y)  # (N,): MONAI's ignore_empty=False would score these 1
    dsc = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(y_pred, y)  # (N, 1)
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)(y_pred, y)  # (N, 1)
    dsc[unscored], iou[unscored] = float("nan"), float("nan")
    nsd = surface_dice(y_pred, y, spacing, tolerance)  # (N, 1)
    return {"dsc": dsc[:, 0].numpy(), "nsd": nsd[:, 0].numpy(), "iou": iou[:, 0].numpy()}


def image_scores(predicted: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None,
                 tolerance: float = 2.0) -> dict[str, float]:
    """DSC, NSD and IoU of one binary mask (H, W) against its truth (H, W); `EMPTY_TRUTH` for empty ones."""
    scores = segmentation_scores(np.asarray(predicted)[None], np.asarray(truth)[None], spacing, tolerance)
    return {name: float(values[0]) for name, values in scores.items()}


def mean_scores(per_image: dict[str, np.ndarray | Sequence[float]]) -> dict[str, float]:
    """Each metric's mean over the images that have a score (MONAI's mean reduction, which skips
    NaN), and n_<metric>: how many images that is. A metric no image has a score for is NaN."""
    from monai.metrics.utils import do_metric_reduction

    means: dict[str, float] = {}
    for name, values in per_image.items():
        scores = torch.as_tensor(np.asarray(values, dtype=np.float32)).reshape(-1, 1)  # (N, 1)
        mean, not_nans = do_metric_reduction(scores, "mean")  # both () tensors
        means[name] = float(mean) if int(not_nans) else float("nan")
        means[f"n_{name}"] = int(not_nans)
    return means


def crop_placement(width: int, height: int, size: int) -> tuple[int, int, int]:
    """(left, top, side) of the preprocess's center crop in the original image's pixels.

    The preprocess resizes the shorter side to `size` (the longer to int(size * long / short),
    torchvision's rule) and crops size x size at int(round((resized - size) / 2)); mapped back,
    the crop is the image's central min(w, h) square, offset along the longer side."""
    short, long = min(width, height), max(width, height)
    resized_long = int(size * long / short)
    offset = int(round(int(round((resized_long - size) / 2.0)) * long / resized_long))
    offset = min(max(offset, 0), long - short)
    return (offset, 0, short) if width > height else (0, offset, short)


def resize_saliency_to_image(saliency: torch.Tensor | np.ndarray, width: int, height: int) -> np.ndarray:
    """A square saliency map (S, S) over the model's input, laid onto the original image (height, width).

    The map is bilinearly resized to the center crop's side (the shorter image side) and pasted at
    the crop's place (`crop_placement`); pixels the crop cut off, which the model never saw, are 0."""
    square = torch.as_tensor(saliency, dtype=torch.float32)  # (S, S)
    if square.ndim != 2 or square.shape[0] != square.shape[1]:
        raise KtpipeError(f"saliency map must be square (S, S), got shape {tuple(square.shape)}")
    left, top, side = crop_placement(width, height, square.shape[0])
    resized = torch.nn.functional.interpolate(square[None, None], size=(side, side), mode="bilinear",
                                              align_corners=False, antialias=side < square.shape[0])[0, 0]
    out = np.zeros((height, width), dtype=np.float32)
    out[top:top + side, left:left + side] = resized.numpy()
    return out
