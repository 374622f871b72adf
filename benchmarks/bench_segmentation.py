"""The segmentation section of benchmarks/bench.py (`--segmentation`): M2IB and gradient saliency
maps per second for a random-init BiomedCLIP-shaped ViT-B/16 at 224 px (batched and one image at a
time), SAM ViT-B masks per second, and MONAI's DSC/NSD/IoU time per 1,000 masks. bench.py runs
`run_segmentation_worker` in its own subprocess and prints `format_segmentation`."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
from devices import device_name, sync, worker_device  # benchmarks/ is on sys.path (bench.py runs as a script)

SEGMENT_TEXT = "a chest x ray with a lung tumor"  # the saliency prompt (words of tests/archs.py's tiny vocabulary)


def timed(device: str, run: Callable[[], Any]) -> tuple[Any, float]:
    """`run()`'s result and its wall seconds, the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    out = run()
    sync(device)
    return out, time.perf_counter() - start


@contextmanager
def forward_starts(module, device: str) -> Iterator[list[float]]:
    """The times at which `module`'s forward calls start, collected while the block runs."""
    starts: list[float] = []

    def stamp(_module, _inputs) -> None:
        sync(device)
        starts.append(time.perf_counter())

    hook = module.register_forward_pre_hook(stamp)
    try:
        yield starts
    finally:
        hook.remove()


def m2ib_step_s(starts: list[float], steps: int) -> float:
    """Mean seconds of a full M2IB step (forward, backward, Adam) from the forward starts of
    `m2ib_token_maps` calls: each makes one clean forward, then one per step; the last step has no
    update, so a call of `steps` steps gives `steps - 1` full steps (NaN when none)."""
    calls = [starts[i:i + 1 + steps] for i in range(0, len(starts), 1 + steps)]
    gaps = [b - a for call in calls for a, b in zip(call[1:-1], call[2:])]
    return sum(gaps) / len(gaps) if gaps else float("nan")


def build_saliency_model(device: str, scratch: Path):
    """A random-init BiomedCLIP (timm ViT-B/16 at 224 px), built as tests/archs.py builds it: the
    published open_clip config with a tiny BERT text tower written offline."""
    from ktpipe.models import OpenClipModel

    sys.path.insert(0, str(REPO / "tests"))
    from archs import biomedclip_config, write_tiny_bert

    return OpenClipModel.from_config(biomedclip_config(write_tiny_bert(scratch / "bert")), device)


def time_m2ib(model, pixels, texts, cfg, device: str) -> dict:
    """Maps per second of M2IB through `compute_saliency`, with `cfg.batch_size` images per call,
    and its full-step seconds (one forward, backward and Adam update of batch x noise copies)."""
    from ktpipe.eval.saliency import compute_saliency

    with forward_starts(model.vision_blocks()[0], device) as starts:
        _, seconds = timed(device, lambda: compute_saliency(model, pixels, texts, cfg))
    step_s = m2ib_step_s(starts, cfg.steps)
    full = type(cfg)()  # SegmentationParams' defaults: MedCLIP-SAMv2's 10 steps x 10 noise samples
    per_copy_step_s = step_s / (min(cfg.batch_size, len(pixels)) * cfg.noise_samples)
    return {"s": seconds, "maps_per_s": len(pixels) / seconds, "step_s": step_s,
            "s_per_image_step_sample": per_copy_step_s,
            "extrapolated_s_per_map": full.steps * full.noise_samples * per_copy_step_s}


def time_saliency(args: argparse.Namespace, device: str) -> dict:
    """M2IB maps per second (batched, one image at a time) and the gradient baseline's, BiomedCLIP."""
    import dataclasses

    import torch

    from ktpipe.params import SegmentationParams
    from ktpipe.eval.saliency import compute_saliency

    scratch = tempfile.TemporaryDirectory()
    model = build_saliency_model(device, Path(scratch.name))
    count = args.segmentation_images
    pixels = torch.rand(count, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(device)  # (B, 3, S, S) in [0, 1]
    with torch.no_grad():
        texts = model.encode_texts([SEGMENT_TEXT] * count)  # (B, D)
    m2ib = SegmentationParams(saliency="m2ib", steps=args.m2ib_steps, noise_samples=args.m2ib_noise_samples,
                              batch_size=count)
    warm_up = dataclasses.replace(m2ib, steps=2, noise_samples=1)  # one forward, backward and update
    compute_saliency(model, pixels[:1], texts[:1], warm_up)
    gradient = SegmentationParams(saliency="gradient", batch_size=count)
    _, gradient_s = timed(device, lambda: compute_saliency(model, pixels, texts, gradient))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    batched = time_m2ib(model, pixels, texts, m2ib, device)
    if device.startswith("cuda"):
        batched["peak_mem_mib"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    alone = time_m2ib(model, pixels, texts, dataclasses.replace(m2ib, batch_size=1), device)
    scratch.cleanup()
    return {"saliency_vision_params_m": sum(p.numel() for p in model.module.visual.parameters()) / 1e6,
            "saliency_image_size": model.image_size, "saliency_layers": model.vision_layers,
            "token_grid": list(model.vision_token_grid()), "segmentation_images": count,
            "m2ib": {k: getattr(m2ib, k) for k in ("layer", "beta", "variance", "lr", "steps", "noise_samples",
                                                   "seed")},
            "m2ib_full": {"steps": SegmentationParams().steps, "noise_samples": SegmentationParams().noise_samples},
            "m2ib_batched": batched, "m2ib_alone": alone,
            "gradient_s": gradient_s, "gradient_maps_per_s": count / gradient_s}


def sam_test_image(size: int, seed: int):
    """A smooth random grayscale image (size x size, RGB mode), as a scan would be."""
    import numpy as np
    from PIL import Image

    small = np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC).convert("RGB")


def time_sam(args: argparse.Namespace, device: str) -> dict:
    """Seconds per image of a random-init SAM ViT-B's `segment` with one centered box, each image
    timed alone (the first includes any warm-up)."""
    from ktpipe.models.sam import SamSegmenter, sam_vit_b_config

    build_start = time.perf_counter()
    sam = SamSegmenter.from_config(sam_vit_b_config(), device=device)
    build_s = time.perf_counter() - build_start
    size = args.sam_image_size
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)  # x0, y0, x1, y1
    per_image = [timed(device, lambda: sam.segment([sam_test_image(size, i)], [[box]]))[1]
                 for i in range(args.sam_images)]
    steady = per_image[1:] or per_image
    return {"sam_build_s": build_s, "sam_params_m": sum(p.numel() for p in sam.model.parameters()) / 1e6,
            "sam_input_size": sam.model.config.vision_config.image_size, "sam_images": args.sam_images,
            "sam_image_size": size, "sam_s_per_image": per_image,
            "sam_masks_per_s": len(steady) / sum(steady), "sam_steady_images": len(steady)}


def synthetic_masks(count: int, size: int = 224, seed: int = 0):
    """(count, size, size) bool truths (random ellipses) and predictions (each truth's ellipse moved
    and resized, every other one drawn as its bounding rectangle), so the scores lie between 0 and 1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]

    def ellipse(cy, cx, ry, rx):
        return ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1

    truth, predicted = np.zeros((2, count, size, size), dtype=bool)
    for i in range(count):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        ry, rx = rng.uniform(0.08, 0.25, 2) * size
        truth[i] = ellipse(cy, cx, ry, rx)
        cy, cx = cy + rng.normal(0, 8), cx + rng.normal(0, 8)  # moved by ~8 px
        ry, rx = ry * rng.uniform(0.8, 1.2), rx * rng.uniform(0.8, 1.2)  # resized by up to 20%
        predicted[i] = ellipse(cy, cx, ry, rx) if i % 2 else (abs(rows - cy) <= ry) & (abs(cols - cx) <= rx)
    return predicted, truth


def time_metrics(count: int, tolerance: float = 2.0) -> dict:
    """Seconds per 1,000 synthetic 224x224 masks of MONAI's scores through ktpipe.eval.masks: batched
    `segmentation_scores`, its DSC, IoU and NSD alone (as it calls them), and per image `image_scores`."""
    import numpy as np
    from monai.metrics import DiceMetric, MeanIoU

    from ktpipe.eval.masks import as_channel_batch, image_scores, segmentation_scores, surface_dice

    predicted, truth = synthetic_masks(count)
    segmentation_scores(predicted[:2], truth[:2], None, tolerance)  # warm-up: MONAI's first call costs more
    y_pred, y = as_channel_batch(predicted), as_channel_batch(truth)  # (N, 1, H, W)
    parts = {"dsc": lambda: DiceMetric(include_background=True, reduction="none", ignore_empty=True)(y_pred, y),
             "iou": lambda: MeanIoU(include_background=True, reduction="none", ignore_empty=True)(y_pred, y),
             "nsd": lambda: surface_dice(y_pred, y, None, tolerance)}
    per_1000 = 1000 / count
    out = {"metric_masks": count, "metric_tolerance": tolerance}
    scores, seconds = timed("cpu", lambda: segmentation_scores(predicted, truth, None, tolerance))
    out["metric_batched_s_per_1000"] = seconds * per_1000
    out["metric_mean"] = {name: float(np.nanmean(values)) for name, values in scores.items()}
    for name, run in parts.items():
        out[f"metric_{name}_s_per_1000"] = timed("cpu", run)[1] * per_1000
    _, seconds = timed("cpu", lambda: [image_scores(p, t, None, tolerance) for p, t in zip(predicted, truth)])
    out["metric_per_image_s_per_1000"] = seconds * per_1000
    return out


def run_segmentation_worker(args: argparse.Namespace) -> dict:
    """Saliency maps (M2IB, gradient), SAM ViT-B masks and MONAI's scores, timed in this process."""
    import torch

    device = worker_device(args.threads, args.device)
    result = {"device": device, "device_name": device_name(device), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "load_average": os.getloadavg()[0]}
    result.update(time_saliency(args, device))
    result.update(time_sam(args, device))
    result.update(time_metrics(args.metric_masks))
    return result


def format_saliency(r: dict) -> list[str]:
    m, full, b, a = r["m2ib"], r["m2ib_full"], r["m2ib_batched"], r["m2ib_alone"]
    n = r["segmentation_images"]
    memory = f"; peak CUDA memory {b['peak_mem_mib']:.0f} MiB" if "peak_mem_mib" in b else ""
    return [
        f"  saliency model: BiomedCLIP's open_clip config (timm vit_base_patch16_224: {r['saliency_layers']} blocks, "
        f"width 768, patch 16, {r['saliency_image_size']} px, token grid {r['token_grid']}), tiny BERT text tower, "
        f"random init; vision tower {r['saliency_vision_params_m']:.0f}M params",
        f"  M2IB (compute_saliency -> m2ib_token_maps: layer {m['layer']}, beta {m['beta']}, variance {m['variance']}, "
        f"lr {m['lr']}, seed {m['seed']}) at steps {m['steps']}, noise samples {m['noise_samples']}, {n} images:",
        f"    batched ({n} bottlenecks optimized together): {b['s']:.1f} s = {b['maps_per_s']:.3f} maps/s; "
        f"full step (fwd+bwd+Adam, {n}x{m['noise_samples']} copies) {b['step_s']:.2f} s{memory}",
        f"    one image at a time:  {a['s']:.1f} s = {a['maps_per_s']:.3f} maps/s; "
        f"full step ({m['noise_samples']} copies) {a['step_s']:.2f} s",
        f"    per image, step and noise sample: batched {b['s_per_image_step_sample']:.3f} s, "
        f"one at a time {a['s_per_image_step_sample']:.3f} s",
        f"    EXTRAPOLATED to MedCLIP-SAMv2's {full['steps']} steps x {full['noise_samples']} noise samples (linear "
        f"in both, from the full step): batched {b['extrapolated_s_per_map']:.1f} s/map "
        f"({1 / b['extrapolated_s_per_map']:.4f} maps/s), one at a time {a['extrapolated_s_per_map']:.1f} s/map "
        f"({1 / a['extrapolated_s_per_map']:.4f} maps/s)",
        f"  gradient x input (layer {m['layer']}), {n} images batched: {r['gradient_s']:.2f} s = "
        f"{r['gradient_maps_per_s']:.2f} maps/s"]


def format_segmentation(r: dict) -> str:
    per_image = ", ".join(f"{s:.1f}" for s in r["sam_s_per_image"])
    names = {"dsc": "DSC", "nsd": "NSD", "iou": "IoU"}
    means = ", ".join(f"{names[k]} {v:.2f}" for k, v in r["metric_mean"].items())
    lines = [f"segmentation on {r['device']} ({r['device_name']}), torch {r['torch']}, threads {r['threads']}, "
             f"1-min load average at start {r['load_average']:.1f} (CPU figures are noisy when the machine is busy)",
             *format_saliency(r),
             f"  SAM ViT-B ({r['sam_params_m']:.0f}M params, random init, {r['sam_input_size']} px input) "
             f"SamSegmenter.segment on {r['sam_images']} {r['sam_image_size']}x{r['sam_image_size']} images, one box "
             f"each: s per image [{per_image}] (the first includes warm-up); {r['sam_masks_per_s']:.3f} masks/s over "
             f"the last {r['sam_steady_images']}",
             f"  MONAI scores of {r['metric_masks']} synthetic 224x224 masks (on the CPU whatever the device; NSD at "
             f"{r['metric_tolerance']:g} px; mean {means}), s per 1,000 masks: segmentation_scores batched "
             f"{r['metric_batched_s_per_1000']:.1f} (alone: DSC {r['metric_dsc_s_per_1000']:.1f}, IoU "
             f"{r['metric_iou_s_per_1000']:.1f}, NSD {r['metric_nsd_s_per_1000']:.1f}); image_scores one at a time "
             f"{r['metric_per_image_s_per_1000']:.1f}"]
    return "\n".join(lines)
