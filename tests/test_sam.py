"""SAM box prompting (ktpipe.models.sam) on a tiny random-init SAM written offline: masks at each
image's own size, the union over boxes, box dependence, determinism, loading and its errors."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import SamConfig

from conftest import STAGE_ENV
from ktpipe.errors import KtpipeError
from ktpipe.models.base import ModelLoadError
from ktpipe.models.sam import SAM_PARAM, SamSegmenter, sam_vit_b_config

# A SAM small enough for milliseconds per call: 64 px input, an 8x8 grid of 8 px patches, width 32.
TINY_SAM = {
    "vision_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 64,
                      "patch_size": 8, "output_channels": 32, "window_size": 4, "global_attn_indexes": [1],
                      "num_pos_feats": 16, "mlp_dim": 64},
    "prompt_encoder_config": {"hidden_size": 32, "image_size": 64, "patch_size": 8, "mask_input_channels": 4},
    "mask_decoder_config": {"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
}
BOX_A = (4, 6, 30, 40)
BOX_B = (40, 10, 76, 46)


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(0)
    return SamSegmenter.from_config(SamConfig(**TINY_SAM))


@pytest.fixture(scope="module")
def sam_folder(tiny_sam, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sam") / "tiny_sam"
    tiny_sam.save(folder)
    return folder


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Two noise images of different shapes: 80x50 (wide) and 40x72 (tall), as (W, H)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 80), (72, 40))]


def test_masks_are_boolean_at_each_images_own_size(sam_folder, images):
    sam = SamSegmenter.load(str(sam_folder))
    masks = sam.segment(images, [[BOX_A], [(2, 3, 20, 30), (10, 40, 38, 70)]])
    assert [m.shape for m in masks] == [(50, 80), (72, 40)]
    assert all(m.dtype == np.bool_ for m in masks)


def test_loaded_folder_gives_the_saved_models_masks(tiny_sam, sam_folder, images):
    boxes = [[BOX_A, BOX_B], [(2, 3, 20, 30)]]
    expected = tiny_sam.segment(images, boxes)
    got = SamSegmenter.load(str(sam_folder)).segment(images, boxes)
    assert all(np.array_equal(g, e) for g, e in zip(got, expected))


def test_image_without_boxes_is_all_false_and_runs_no_sam(tiny_sam, images):
    calls = []
    hook = tiny_sam.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        masks = tiny_sam.segment(images, [[], [(2, 3, 20, 30)]])
    finally:
        hook.remove()
    assert masks[0].shape == (50, 80) and not masks[0].any()
    assert len(calls) == 1


def test_same_input_gives_the_same_masks(tiny_sam, images):
    boxes = [[BOX_A, BOX_B], [(2, 3, 20, 30)]]
    first, second = tiny_sam.segment(images, boxes), tiny_sam.segment(images, boxes)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_union_over_boxes_is_each_boxs_mask_united(tiny_sam, images):
    image = images[:1]
    (mask_a,), (mask_b,) = tiny_sam.segment(image, [[BOX_A]]), tiny_sam.segment(image, [[BOX_B]])
    (both,) = tiny_sam.segment(image, [[BOX_A, BOX_B]])
    assert not np.array_equal(mask_a, mask_b)  # the box prompt steers the mask
    assert mask_a.any() and mask_b.any() and not both.all()
    np.testing.assert_array_equal(both, mask_a | mask_b)


def test_multimask_keeps_the_mask_with_the_best_predicted_iou(tiny_sam, images):
    image, box = images[0], BOX_A
    inputs = tiny_sam.processor(images=[image], input_boxes=[[list(map(float, box))]], return_tensors="pt")
    with torch.no_grad():
        out = tiny_sam.model(**inputs, multimask_output=True)
    masks = tiny_sam.processor.image_processor.post_process_masks(
        out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0][0]  # (3, H, W)
    best = masks[out.iou_scores[0, 0].argmax()].numpy()
    multimask = SamSegmenter(tiny_sam.model, tiny_sam.processor, multimask=True)
    np.testing.assert_array_equal(multimask.segment([image], [[box]])[0], best)


def test_box_outside_the_image_or_box_count_mismatch_is_an_error(tiny_sam, images):
    with pytest.raises(KtpipeError, match=r"\(0, 0, 81, 10\) of image 0 does not lie in its 80x50"):
        tiny_sam.segment(images[:1], [[(0, 0, 81, 10)]])
    with pytest.raises(KtpipeError, match="2 images but 1 box lists"):
        tiny_sam.segment(images, [[BOX_A]])


def test_missing_folder_is_a_load_error_naming_it(tmp_path):
    folder = tmp_path / "no_sam_here"
    with pytest.raises(ModelLoadError, match=rf"'{folder}'.*no such folder.*{SAM_PARAM}"):
        SamSegmenter.load(str(folder))


def test_folder_without_sam_weights_is_a_load_error(tmp_path, sam_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=rf"'{empty}'.*no file named model.safetensors.*downloaded"):
        SamSegmenter.load(empty)
    partial = tmp_path / "partial"
    shutil.copytree(sam_folder, partial)
    weights = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("mask_decoder.iou_prediction_head.")},
              partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"of SAM's weights are not in it.*iou_prediction_head.*at random"):
        SamSegmenter.load(partial)


def test_unknown_hub_id_offline_is_a_load_error_naming_it():
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: a fresh interpreter with it set (no retries)
    code = "from ktpipe.models.sam import SamSegmenter; SamSegmenter.load('ktpipe-tests/no-such-sam')"
    done = subprocess.run([sys.executable, "-c", code], env=STAGE_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "ModelLoadError: cannot load SAM checkpoint 'ktpipe-tests/no-such-sam'" in done.stderr
    assert SAM_PARAM in done.stderr


def test_vit_b_config_is_sam_vit_base():
    vision = sam_vit_b_config().vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (768, 12, 12)
    assert list(vision.global_attn_indexes) == [2, 5, 8, 11] and vision.image_size == 1024
