"""Inversion and zero-shot evaluation speed of open_clip models and ViLT on this machine.

For each model, in a fresh subprocess (so peak memory figures do not mix):
- inversion: the real `ktpipe.transfer.invert.invert_text` (paper Eq. 3, `samples` images as one batch)
  at the model's input size; the first step is a warm-up, the next `--steps` are timed from
  one forward call of the network (CLIP: its visual tower) to the next;
- peak memory of that inversion: `torch.cuda.max_memory_allocated` on CUDA, otherwise the
  growth of the process peak RSS (`getrusage` ru_maxrss) over its value before the model was built;
- zero-shot evaluation: a dual encoder's `ktpipe.eval.classification.embed_images` (decode JPEG,
  preprocess from PIL, encode) on synthetic 500x375 JPEG files, after one warm-up batch; for
  ViLT (`vilt-b32`, a cross-encoder) image-text matching passes per second through
  `pair_class_scores` (every image with every text, as retrieval's `all_pairs` and zero-shot
  classification score), on the same JPEGs and `--eval-texts` 12-word texts.

With `--captioning` (paper Tables 6 and 9), also, in its own subprocess:
- caption generation: captions per second of `--caption-model` (default `coca_ViT-L-14`, random init,
  224 px) through `OpenClipCaptioner.generate_captions`, one batch of `--caption-images` images at
  the CoCa presets' decoding settings (beam search, 6 beams, 30 tokens, at least 5), after no
  warm-up (a batch takes minutes on a CPU). A random-init decoder never ends a caption early, so
  every caption runs the full `--caption-max-length` steps: an upper bound for trained weights;
- caption scoring: pycocoevalcap on `--score-captions` synthetic candidate captions with 5
  references each (MSCOCO Karpathy test: 5,000): PTB tokenizer, BLEU@1-4, METEOR, ROUGE-L and CIDEr
  timed one by one (SPICE needs Stanford CoreNLP jars that cannot be downloaded offline: skipped).
`--captioning-only` runs just that section.

With `--segmentation` (MedCLIP-SAMv2's zero-shot segmentation), also, in its own subprocess:
- saliency: `ktpipe.eval.saliency.compute_saliency` (M2IB through `m2ib_token_maps`: layer 7, beta 0.1,
  variance 1, lr 1) maps per second on `--segmentation-images` random 224 px images for a random-init
  BiomedCLIP (its published open_clip config, a timm ViT-B/16 vision tower, with the tiny BERT text
  tower that tests/archs.py writes offline); batched (one bottleneck per image, all optimized together)
  and one image at a time, at `--m2ib-steps` / `--m2ib-noise-samples`.
  Each full M2IB step (forward, backward, Adam) is timed from one vision forward to the next, and the
  seconds per map at MedCLIP-SAMv2's settings (SegmentationParams' 10 steps x 10 noise samples) are
  extrapolated from it, linear in both. Also the gradient x input baseline, batched;
- SAM: masks per second of a random-init SAM ViT-B (`SamSegmenter.segment`, one box per image) on
  `--sam-images` `--sam-image-size` px images, each timed (the first includes warm-up);
- scores: MONAI's DSC, IoU and NSD (`ktpipe.eval.masks.segmentation_scores`, batched, each metric timed
  alone too, and per image `image_scores`) on `--metric-masks` synthetic 224x224 masks, reported
  per 1,000 masks. The metrics run on the CPU whatever the device.
One warm-up map and one warm-up scoring go first.
`--segmentation-only` runs just that section.

Random init by default (offline; same compute as real weights). Run `--help` for options.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_segmentation import format_segmentation, run_segmentation_worker  # benchmarks/ is on sys.path
from devices import device_name, peak_rss_mib, sync, worker_device

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing ktpipe

PAPER_STEPS = 5000  # inversion steps per concept in the paper (InvertParams.steps default)
CAPTIONING = "captioning"  # internal worker name of the captioning section
SEGMENTATION = "segmentation"  # internal worker name of the segmentation section
VILT = "vilt-b32"  # ViLT-B/32 (ViltConfig's default shape, 384 px), random init, through the vilt backend


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14", VILT],
                        help=f"open_clip architecture names, or {VILT!r} (ViLT-B/32 at 384 px)")
    parser.add_argument("--steps", type=int, default=3, help="timed inversion steps after one warm-up (3 suits a CPU)")
    parser.add_argument("--samples", type=int, default=10, help="images inverted together (paper: 10)")
    parser.add_argument("--eval-images", type=int, default=64, help="images embedded in the timed evaluation")
    parser.add_argument("--eval-batch", type=int, default=64, help="evaluation batch size")
    parser.add_argument("--eval-texts", type=int, default=8, help="ViLT: texts scored with every evaluation image")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag (downloads); default random init")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--captioning", action="store_true", help="also time CoCa caption generation and scoring")
    parser.add_argument("--captioning-only", action="store_true", help="only the captioning section")
    parser.add_argument("--caption-model", default="coca_ViT-L-14", help="open_clip CoCa architecture")
    parser.add_argument("--caption-images", type=int, default=2, help="images captioned in one timed batch")
    parser.add_argument("--caption-beams", type=int, default=6, help="beam search beams (CoCa presets: 6)")
    parser.add_argument("--caption-max-length", type=int, default=30, help="tokens per caption (CoCa presets: 30)")
    parser.add_argument("--caption-min-length", type=int, default=5, help="tokens before an end (CoCa presets: 5)")
    parser.add_argument("--score-captions", type=int, default=5000, help="synthetic captions scored (Karpathy 5K)")
    parser.add_argument("--segmentation", action="store_true",
                        help="also time saliency maps (M2IB, gradient), SAM ViT-B and MONAI's scores")
    parser.add_argument("--segmentation-only", action="store_true", help="only the segmentation section")
    parser.add_argument("--segmentation-images", type=int, default=2, help="images given saliency maps (timed)")
    parser.add_argument("--m2ib-steps", type=int, default=2,
                        help="M2IB optimization steps (MedCLIP-SAMv2: 10; at least 2 to time a full step)")
    parser.add_argument("--m2ib-noise-samples", type=int, default=2,
                        help="M2IB noisy copies of each image per step (MedCLIP-SAMv2: 10)")
    parser.add_argument("--sam-images", type=int, default=2, help="images segmented by SAM ViT-B, one box each")
    parser.add_argument("--sam-image-size", type=int, default=1024, help="side of SAM's square test images, px")
    parser.add_argument("--metric-masks", type=int, default=200,
                        help="synthetic 224x224 masks scored (figures are per 1,000 masks)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one model, JSON to stdout
    return parser.parse_args(argv)


def write_random_vilt(folder: Path) -> Path:
    """A random-init ViLT-B/32 (ViltConfig's defaults: 384 px, patch 32, 12 layers, 40 tokens) with
    a retrieval head and a word-level BERT tokenizer of the benchmark's words, in transformers'
    layout: the vilt backend loads it as it loads a hub checkpoint."""
    from transformers import BertTokenizerFast, ViltConfig, ViltForImageAndTextRetrieval, ViltImageProcessor, ViltProcessor

    words = sorted(set(" ".join(TEXTS).lower().replace(".", " .").split()))
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(str(folder / "vocab.txt"))
    ViltForImageAndTextRetrieval(ViltConfig()).save_pretrained(folder, safe_serialization=True)
    ViltProcessor(ViltImageProcessor(), tokenizer).save_pretrained(folder)
    return folder


TEXTS = [f"a photo of a red lantern number {i} glowing in the dark near a wall." for i in range(256)]


def build_model(name: str, pretrained: str | None, device: str, scratch: Path):
    """A ktpipe model: open_clip random init from its config or a pretrained tag; ViLT-B/32 random
    init written to `scratch` (or a hub id / folder as `pretrained`), through the vilt backend."""
    from ktpipe.models import OpenClipModel, load_model

    if name == VILT:
        return load_model("vilt", pretrained or f"local-dir:{write_random_vilt(scratch)}", None, device)
    import open_clip

    if pretrained:
        return OpenClipModel.load(name, pretrained, device)
    return OpenClipModel.from_config(open_clip.get_model_config(name), device, name=name)


def time_inversion(model, steps: int, samples: int, device: str) -> dict:
    """Seconds per steady-state step of `invert_text`, from the start of one visual forward to the next."""
    from ktpipe.transfer.invert import invert_text
    from ktpipe.params import InvertParams

    starts: list[float] = []

    def stamp(module, inputs):
        sync(device)
        starts.append(time.perf_counter())

    network = getattr(model.module, "visual", model.module)  # CLIP: one visual forward per step
    hook = network.register_forward_pre_hook(stamp)
    try:
        invert_text(model, "a red lantern glowing in the dark", InvertParams(steps=1 + steps, samples=samples),
                    seed=0, progress=False)
    finally:
        hook.remove()
    gaps = [b - a for a, b in zip(starts, starts[1:])]  # step k: gaps[k]; the last call is the final scoring
    timed = gaps[1:1 + steps]
    return {"warmup_step_s": gaps[0], "step_s": sum(timed) / len(timed), "steps_per_s": len(timed) / sum(timed)}


def write_jpegs(folder: Path, count: int) -> tuple[str, ...]:
    """Smooth synthetic 500x375 JPEGs (ImageNet's typical size), so decoding costs what a photo does."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        path = folder / f"{i:05d}.jpg"
        small.resize((500, 375), Image.BICUBIC).save(path, quality=90)
        paths.append(str(path))
    return tuple(paths)


def time_evaluation(model, images: int, batch: int, device: str, texts: int) -> dict:
    """Images per second through the evaluation's image path (decode, preprocess, encode); for a
    cross-encoder, image-text pairs per second (decode, preprocess, one ITM pass per pair)."""
    import torch

    from ktpipe.eval.classification import embed_images, pair_class_scores
    from ktpipe.models.base import is_dual_encoder

    model.module.eval()
    dual = is_dual_encoder(model)
    prompts = [(text,) for text in TEXTS[:texts]]
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), images)

        def run(chosen: tuple[str, ...]) -> None:
            if dual:
                embed_images(model, chosen, batch, progress=False)
            else:
                with torch.no_grad():
                    pair_class_scores(model, chosen, prompts, batch, progress=False)

        run(paths[:batch])  # warm-up batch
        sync(device)
        start = time.perf_counter()
        run(paths)
        sync(device)
        seconds = time.perf_counter() - start
    out = {"eval_images": images, "eval_batch": batch, "eval_s": seconds, "eval_images_per_s": images / seconds}
    if not dual:
        out.update(eval_texts=texts, pairs_per_s=images * texts / seconds)
    return out


def run_worker(args: argparse.Namespace) -> dict:
    """Benchmark one model in this process and return its figures."""
    import torch

    device = worker_device(args.threads, args.device)
    scratch = tempfile.TemporaryDirectory()
    rss_before = peak_rss_mib()
    build_start = time.perf_counter()
    model = build_model(args.worker, args.pretrained, device, Path(scratch.name))
    build_s = time.perf_counter() - build_start
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    result = {
        "model": args.worker, "init": args.pretrained or "random", "device": device,
        "device_name": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "image_size": model.image_size, "samples": args.samples, "timed_steps": args.steps,
        "params_m": sum(p.numel() for p in model.module.parameters()) / 1e6, "build_s": build_s,
    }
    result.update(time_inversion(model, args.steps, args.samples, device))
    result["s_per_5k_concept"] = PAPER_STEPS * result["step_s"]
    if device.startswith("cuda"):
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
        result["peak_mem_method"] = "torch.cuda.max_memory_allocated (weights + inversion)"
    else:
        result["peak_mem_mib"] = peak_rss_mib() - rss_before
        result["peak_mem_method"] = "peak RSS growth, getrusage ru_maxrss (weights + inversion)"
    result.update(time_evaluation(model, args.eval_images, args.eval_batch, device, args.eval_texts))
    scratch.cleanup()
    return result


CAPTION_WORDS = ("a man woman dog cat person bus train pizza table street riding sitting standing on in with near "
                 "the of two red white large small plate bicycle couch laptop field water").split()


def synthetic_captions(count: int, seed: int = 0) -> tuple[dict, dict]:
    """`count` candidate captions with 5 references each, 8-12 random words, as pycocoevalcap's
    {id: [{'caption': text}]} dicts (the PTB tokenizer's input)."""
    import random

    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(8, 12))) + "."

    gts = {i: [{"caption": sentence()} for _ in range(5)] for i in range(count)}
    res = {i: [{"caption": sentence()}] for i in range(count)}
    return gts, res


def time_caption_scoring(count: int) -> dict:
    """Seconds pycocoevalcap takes per scorer on `count` synthetic captions (SPICE skipped: offline)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts, res = synthetic_captions(count)
    out = {"scored_captions": count}
    start = time.perf_counter()
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    out["score_tokenize_s"] = time.perf_counter() - start
    for name, make in (("bleu", Bleu), ("meteor", Meteor), ("rouge_l", Rouge), ("cider", Cider)):
        begin = time.perf_counter()
        scorer = make(4) if name == "bleu" else make()
        out[f"score_{name}"] = float(scorer.compute_score(gts, res)[0][-1] if name == "bleu"
                                     else scorer.compute_score(gts, res)[0])
        out[f"score_{name}_s"] = time.perf_counter() - begin
        if name == "meteor":
            scorer.close() if hasattr(scorer, "close") else None
    out["score_total_s"] = time.perf_counter() - start
    out["score_spice"] = "skipped (Stanford CoreNLP jars not downloadable offline)"
    return out


def run_captioning_worker(args: argparse.Namespace) -> dict:
    """Caption generation of a random-init CoCa and pycocoevalcap scoring, in this process."""
    import open_clip
    import torch

    from ktpipe.models import OpenClipModel

    device = worker_device(args.threads, args.device)
    build_start = time.perf_counter()
    model = OpenClipModel.from_config(open_clip.get_model_config(args.caption_model), device=device,
                                      name=args.caption_model)
    build_s = time.perf_counter() - build_start
    settings = {"method": "beam_search", "beams": args.caption_beams, "max_length": args.caption_max_length,
                "min_length": args.caption_min_length}
    size = model.image_size
    pixels = torch.rand(args.caption_images, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    start = time.perf_counter()
    with torch.no_grad():
        captions = model.generate_captions(pixels, **settings)
    sync(device)
    generate_s = time.perf_counter() - start
    result = {"model": args.caption_model, "init": "random", "device": device, "device_name": device_name(device),
              "threads": torch.get_num_threads(), "image_size": size, "build_s": build_s,
              "params_m": sum(p.numel() for p in model.module.parameters()) / 1e6, "settings": settings,
              "caption_images": args.caption_images, "generate_s": generate_s,
              "captions_per_s": args.caption_images / generate_s,
              "caption_words": [len(c.split()) for c in captions]}
    result["s_per_5k_captions"] = 5000 / result["captions_per_s"]
    result.update(time_caption_scoring(args.score_captions))
    return result


def format_captioning(r: dict) -> str:
    s = r["settings"]
    lines = [f"captioning: {r['model']} ({r['params_m']:.0f}M params, random init, {r['image_size']} px) on "
             f"{r['device']} ({r['device_name']}), threads {r['threads']}",
             f"  generation: {s['method']}, {s['beams']} beams, max_length {s['max_length']}, min_length "
             f"{s['min_length']}; one batch of {r['caption_images']} images: {r['generate_s']:.1f} s = "
             f"{r['captions_per_s']:.4f} captions/s ({r['s_per_5k_captions'] / 3600:.1f} h per 5K test set)",
             f"  scoring {r['scored_captions']} captions (5 refs each), pycocoevalcap: tokenize "
             f"{r['score_tokenize_s']:.1f} s, BLEU {r['score_bleu_s']:.1f} s, METEOR {r['score_meteor_s']:.1f} s, "
             f"ROUGE-L {r['score_rouge_l_s']:.1f} s, CIDEr {r['score_cider_s']:.1f} s; total "
             f"{r['score_total_s']:.1f} s; SPICE: {r['score_spice']}"]
    return "\n".join(lines)


def worker_command(args: argparse.Namespace, model: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model, "--steps", str(args.steps),
           "--samples", str(args.samples), "--eval-images", str(args.eval_images),
           "--eval-batch", str(args.eval_batch), "--eval-texts", str(args.eval_texts), "--device", args.device]
    if args.pretrained:
        cmd += ["--pretrained", args.pretrained]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if model == CAPTIONING:
        cmd += ["--caption-model", args.caption_model, "--caption-images", str(args.caption_images),
                "--caption-beams", str(args.caption_beams), "--caption-max-length", str(args.caption_max_length),
                "--caption-min-length", str(args.caption_min_length), "--score-captions", str(args.score_captions)]
    if model == SEGMENTATION:
        cmd += ["--segmentation-images", str(args.segmentation_images), "--m2ib-steps", str(args.m2ib_steps),
                "--m2ib-noise-samples", str(args.m2ib_noise_samples), "--sam-images", str(args.sam_images),
                "--sam-image-size", str(args.sam_image_size), "--metric-masks", str(args.metric_masks)]
    return cmd


def run_model(args: argparse.Namespace, model: str) -> dict:
    """One model in a fresh subprocess; its last stdout line is the JSON result."""
    proc = subprocess.run(worker_command(args, model), capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"benchmark of {model} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(results: list[dict]) -> str:
    header = ("model", "size", "params M", "invert steps/s", "s/step", "s per 5k-step concept",
              "peak mem MiB", "eval img/s", "ITM pairs/s")
    rows = [(r["model"], str(r["image_size"]), f"{r['params_m']:.0f}", f"{r['steps_per_s']:.3f}",
             f"{r['step_s']:.2f}", f"{r['s_per_5k_concept']:.0f} ({r['s_per_5k_concept'] / 3600:.2f} h)",
             f"{r['peak_mem_mib']:.0f}", f"{r['eval_images_per_s']:.1f}",
             f"{r['pairs_per_s']:.1f}" if "pairs_per_s" in r else "-") for r in results]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in (header, *rows)]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        workers = {CAPTIONING: run_captioning_worker, SEGMENTATION: run_segmentation_worker}
        print(json.dumps(workers.get(args.worker, run_worker)(args)))
        return
    start = time.perf_counter()
    results, captioning, segmentation = [], None, None
    if args.captioning or args.captioning_only:
        print(f"benchmarking captioning ({args.caption_model}) ...", file=sys.stderr, flush=True)
        captioning = run_model(args, CAPTIONING)
        print(format_captioning(captioning))
    if args.segmentation or args.segmentation_only:
        print("benchmarking segmentation (BiomedCLIP saliency, SAM ViT-B, MONAI scores) ...", file=sys.stderr,
              flush=True)
        segmentation = run_model(args, SEGMENTATION)
        print(format_segmentation(segmentation))
    for model in [] if args.captioning_only or args.segmentation_only else args.models:
        print(f"benchmarking {model} ...", file=sys.stderr, flush=True)
        results.append(run_model(args, model))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "worker")}
        args.json.write_text(json.dumps({"settings": settings, "results": results, "captioning": captioning,
                                         "segmentation": segmentation}, indent=2, default=str) + "\n")
    if not results:
        print(f"wall time {time.perf_counter() - start:.0f} s")
        return
    first = results[0]
    print(f"device: {first['device']} ({first['device_name']}), torch {first['torch']}, threads {first['threads']}, "
          f"init: {first['init']}")
    print(f"inversion: batch {args.samples}, {args.steps} timed steps after 1 warm-up; "
          f"eval: {args.eval_images} JPEGs, batch {args.eval_batch}; peak mem: {first['peak_mem_method']}")
    print(format_table(results))
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
