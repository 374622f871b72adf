"""Inversion and zero-shot evaluation speed of open_clip models on this machine.

For each model, in a fresh subprocess (so peak memory figures do not mix):
- inversion: the real `ktpipe.invert.invert_text` (paper Eq. 3, `samples` images as one batch)
  at the model's input size; the first step is a warm-up, the next `--steps` are timed from
  one visual-tower forward call to the next;
- peak memory of that inversion: `torch.cuda.max_memory_allocated` on CUDA, otherwise the
  growth of the process peak RSS (`getrusage` ru_maxrss) over its value before the model was built;
- zero-shot evaluation: `ktpipe.eval.classification.embed_images` (decode JPEG, preprocess
  from PIL, encode) on synthetic 500x375 JPEG files, after one warm-up batch.

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"], help="open_clip architecture names")
    parser.add_argument("--steps", type=int, default=3, help="timed inversion steps after one warm-up (3 suits a CPU)")
    parser.add_argument("--samples", type=int, default=10, help="images inverted together (paper: 10)")
    parser.add_argument("--eval-images", type=int, default=64, help="images embedded in the timed evaluation")
    parser.add_argument("--eval-batch", type=int, default=64, help="evaluation batch size")
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


def build_model(name: str, pretrained: str | None, device: str):
    """A ktpipe open_clip model: random init from open_clip's config, or a pretrained tag."""
    import open_clip

    from ktpipe.models import OpenClipModel

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

    hook = model.module.visual.register_forward_pre_hook(stamp)
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


def time_evaluation(model, images: int, batch: int, device: str) -> dict:
    """Images per second through the evaluation's image path (decode, preprocess, encode)."""
    from ktpipe.eval.classification import embed_images

    model.module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), images)
        embed_images(model, paths[:batch], batch, progress=False)  # warm-up batch
        sync(device)
        start = time.perf_counter()
        embed_images(model, paths, batch, progress=False)
        sync(device)
        seconds = time.perf_counter() - start
    return {"eval_images": images, "eval_batch": batch, "eval_s": seconds, "eval_images_per_s": images / seconds}


def run_worker(args: argparse.Namespace) -> dict:
    """Benchmark one model in this process and return its figures."""
    import torch

    from ktpipe.models import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rss_before = peak_rss_mib()
    build_start = time.perf_counter()
    model = build_model(args.worker, args.pretrained, device)
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
    result.update(time_evaluation(model, args.eval_images, args.eval_batch, device))
    return result


def worker_command(args: argparse.Namespace, model: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model, "--steps", str(args.steps),
           "--samples", str(args.samples), "--eval-images", str(args.eval_images),
           "--eval-batch", str(args.eval_batch), "--device", args.device]
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
              "peak mem MiB", "eval img/s")
    rows = [(r["model"], str(r["image_size"]), f"{r['params_m']:.0f}", f"{r['steps_per_s']:.3f}",
             f"{r['step_s']:.2f}", f"{r['s_per_5k_concept']:.0f} ({r['s_per_5k_concept'] / 3600:.2f} h)",
             f"{r['peak_mem_mib']:.0f}", f"{r['eval_images_per_s']:.1f}") for r in results]
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
