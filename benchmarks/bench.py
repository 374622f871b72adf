"""Inversion and zero-shot evaluation speed of open_clip models and ViLT on this machine.

For each model, in a fresh subprocess (so peak memory figures do not mix):
- inversion: the real `ktpipe.invert.invert_text` (paper Eq. 3, `samples` images as one batch)
  at the model's input size; the first step is a warm-up, the next `--steps` are timed from
  one forward call of the network (CLIP: its visual tower) to the next;
- peak memory of that inversion: `torch.cuda.max_memory_allocated` on CUDA, otherwise the
  growth of the process peak RSS (`getrusage` ru_maxrss) over its value before the model was built;
- zero-shot evaluation: a dual encoder's `ktpipe.eval.classification.embed_images` (decode JPEG,
  preprocess from PIL, encode) on synthetic 500x375 JPEG files, after one warm-up batch; for
  ViLT (`vilt-b32`, a cross-encoder) image-text matching passes per second through
  `pair_class_scores` (every image with every text, as retrieval's `all_pairs` and zero-shot
  classification score), on the same JPEGs and `--eval-texts` 12-word texts.

Random init by default (offline; same compute as real weights). Run `--help` for options.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing ktpipe

PAPER_STEPS = 5000  # inversion steps per concept in the paper (InvertParams.steps default)
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
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one model, JSON to stdout
    return parser.parse_args(argv)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


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


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def time_inversion(model, steps: int, samples: int, device: str) -> dict:
    """Seconds per steady-state step of `invert_text`, from the start of one visual forward to the next."""
    from ktpipe.invert import invert_text
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

    from ktpipe.models import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
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


def worker_command(args: argparse.Namespace, model: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model, "--steps", str(args.steps),
           "--samples", str(args.samples), "--eval-images", str(args.eval_images),
           "--eval-batch", str(args.eval_batch), "--eval-texts", str(args.eval_texts), "--device", args.device]
    if args.pretrained:
        cmd += ["--pretrained", args.pretrained]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
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
        print(json.dumps(run_worker(args)))
        return
    start = time.perf_counter()
    results = []
    for model in args.models:
        print(f"benchmarking {model} ...", file=sys.stderr, flush=True)
        results.append(run_model(args, model))
    first = results[0]
    print(f"device: {first['device']} ({first['device_name']}), torch {first['torch']}, threads {first['threads']}, "
          f"init: {first['init']}")
    print(f"inversion: batch {args.samples}, {args.steps} timed steps after 1 warm-up; "
          f"eval: {args.eval_images} JPEGs, batch {args.eval_batch}; peak mem: {first['peak_mem_method']}")
    print(format_table(results))
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "worker")}
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
