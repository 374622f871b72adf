"""SAM prompted with boxes, through transformers' `SamModel` and `SamProcessor`: the last step of
MedCLIP-SAMv2's zero-shot segmentation (saliency map -> coarse mask -> one box per connected
component -> SAM -> the union of SAM's masks over the boxes, which the evaluation then cuts to its
K largest components, K the coarse mask's count: `ktpipe.eval.masks.keep_sam_components`).

As MedCLIP-SAMv2's `segment-anything/prompt_sam.py` runs it (`zeroshot.sh`): box prompts only, one
mask per box (`multimask_output=False`, its default), the masks binarized at logit 0 at the image's
original size and united over the boxes. `multimask=True` instead keeps, per box, the one of SAM's
three masks with the highest predicted IoU (SAM's own rule for ambiguous prompts).

A checkpoint is a hub id or a local folder in transformers' layout (`config.json`, weights,
`preprocessor_config.json`), named by params key 'evaluate.segmentation.sam'. A checkpoint that
cannot be found, or that leaves any of SAM's weights to random initialization, is refused
(`ModelLoadError`); nothing falls back silently.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor, SamVisionConfig

from ktpipe.errors import KtpipeError
from ktpipe.models.base import ModelLoadError

SAM_PARAM = "evaluate.segmentation.sam"  # the params key that names the SAM checkpoint
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in the original image's pixels


def sam_vit_b_config() -> SamConfig:
    """SAM ViT-B's architecture (facebook/sam-vit-base), for random-init models (benchmarks)."""
    vision = SamVisionConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             global_attn_indexes=[2, 5, 8, 11], image_size=1024, patch_size=16)
    return SamConfig(vision_config=vision)


def build_processor(image_size: int) -> SamProcessor:
    """SAM's processor for a model that reads `image_size` px: longest side resized to it, padded
    to a square, masks at a quarter of it (SAM's low-resolution masks); built offline."""
    low_res = image_size // 4
    image_processor = SamImageProcessor(size={"longest_edge": image_size},
                                        pad_size={"height": image_size, "width": image_size},
                                        mask_size={"longest_edge": low_res},
                                        mask_pad_size={"height": low_res, "width": low_res})
    return SamProcessor(image_processor)


def load_error(name: str, reason: str) -> ModelLoadError:
    return ModelLoadError(f"cannot load SAM checkpoint {name!r}: {reason}. SAM must be downloaded beforehand (a hub "
                          f"id in the local cache, e.g. facebook/sam-vit-base) or given as a folder in transformers' "
                          f"layout; params key '{SAM_PARAM}'")


def looks_like_path(name: str) -> bool:
    """Whether `name` can only be a folder (absolute, relative or home path), never a hub id."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


def read_checkpoint(source: str, local: bool, name: str) -> tuple[SamModel, SamProcessor, list[str]]:
    """Model, processor and the names of the weights the checkpoint lacks (`name`: as the user gave it)."""
    try:
        model, info = SamModel.from_pretrained(source, local_files_only=local, output_loading_info=True)
        processor = SamProcessor.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as err:  # not found, offline, not a repo id (HFValidationError), bad config
        raise load_error(name, str(err).splitlines()[0]) from err
    return model, processor, list(info["missing_keys"])


def check_boxes(image: Image.Image, boxes: list[Box], index: int) -> None:
    """Stop on a box that is not (x0, y0, x1, y1) inside the image with x0 <= x1 and y0 <= y1."""
    width, height = image.size
    for box in boxes:
        if len(box) != 4:
            raise KtpipeError(f"SAM box {box!r} of image {index} is not (x0, y0, x1, y1)")
        x0, y0, x1, y1 = box
        if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
            raise KtpipeError(f"SAM box {tuple(box)} of image {index} does not lie in its {width}x{height} pixels "
                              "as (x0, y0, x1, y1)")


class SamSegmenter:
    """SAM prompted with boxes: images and their boxes -> one boolean mask per image."""

    def __init__(self, model: SamModel, processor: SamProcessor, device: str = "cpu", multimask: bool = False):
        vision_size = model.config.vision_config.image_size
        processor_size = processor.image_processor.size["longest_edge"]
        if processor_size != vision_size:
            raise ModelLoadError(f"SAM processor resizes to {processor_size} px but the model reads {vision_size} px")
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.multimask = multimask  # False: SAM's single mask per box; True: the best of its three by predicted IoU

    @classmethod
    def load(cls, name: str | Path, device: str = "cpu", multimask: bool = False) -> "SamSegmenter":
        """A hub id (from the local cache when offline) or a local folder."""
        name = str(name)
        folder = Path(name).expanduser()
        local = folder.is_dir()
        if not local and looks_like_path(name):
            raise load_error(name, "no such folder")
        model, processor, missing = read_checkpoint(str(folder) if local else name, local, name)
        if missing:
            raise load_error(name, f"{len(missing)} of SAM's weights are not in it (e.g. {sorted(missing)[:3]}); "
                                   "transformers would start them at random")
        return cls(model, processor, device, multimask)

    @classmethod
    def from_config(cls, config: SamConfig, device: str = "cpu", multimask: bool = False) -> "SamSegmenter":
        """A random-init SAM of `config` (tests, benchmarks), with a processor built offline."""
        return cls(SamModel(config), build_processor(config.vision_config.image_size), device, multimask)

    def save(self, folder: Path) -> None:
        """Write model and processor in transformers' layout, so `load(folder)` reads them again."""
        self.model.save_pretrained(Path(folder))
        self.processor.save_pretrained(Path(folder))

    @torch.no_grad()
    def segment(self, images: list[Image.Image], boxes: list[list[Box]]) -> list[np.ndarray]:
        """For each image, the union of SAM's masks over its boxes: bool (H, W) at the image's own size;
        all False for an image without boxes (SAM is not run). One SAM call per image with boxes, its
        boxes in one batch: transformers' processor needs as many boxes for every image of a batch."""
        if len(boxes) != len(images):
            raise KtpipeError(f"SAM got {len(images)} images but {len(boxes)} box lists")
        masks = []
        for index, (image, image_boxes) in enumerate(zip(images, boxes)):
            check_boxes(image, image_boxes, index)
            if image_boxes:
                masks.append(self.segment_one(image, image_boxes))
            else:
                masks.append(np.zeros((image.height, image.width), dtype=bool))
        return masks

    @torch.no_grad()
    def segment_one(self, image: Image.Image, boxes: list[Box]) -> np.ndarray:
        """The union of SAM's masks for one image's boxes (at least one): bool (H, W)."""
        inputs = self.processor(images=[image.convert("RGB")], input_boxes=[[list(map(float, box)) for box in boxes]],
                                return_tensors="pt").to(self.device)
        outputs = self.model(**inputs, multimask_output=self.multimask)
        low_res = outputs.pred_masks[0]  # (K, M, h, w) logits: K boxes, M masks each (1, or 3 with multimask)
        if self.multimask:
            best = outputs.iou_scores[0].argmax(dim=-1)  # (K,)
            low_res = low_res[torch.arange(len(boxes), device=best.device), best].unsqueeze(1)  # (K, 1, h, w)
        masks = self.processor.image_processor.post_process_masks(
            [low_res], inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]  # (K, 1, H, W) bool
        return masks.any(dim=(0, 1)).cpu().numpy()
