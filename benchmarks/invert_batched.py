"""Inversion images per second: each concept on its own (`invert.concepts_per_batch: 1`, one
`invert_text` run per concept) against concepts batched (`invert_texts`, concepts x samples
images per forward pass), on the same model, steps and texts, in one process.

    python benchmarks/invert_batched.py                       # the demo CLIP (32 px), 11 concepts
    python benchmarks/invert_batched.py --model ViT-B-32 --concepts 4 --steps 3   # random init, 224 px

Prints, per mode, seconds, images per second (concepts x samples x steps / seconds) and the
speed-up, and the largest pixel difference between the two (rounding only). `--device cuda`
on a GPU machine; `--threads` pins torch's CPU threads.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing ktpipe

from ktpipe.models import load_model  # noqa: E402
from ktpipe.params import InvertParams
from ktpipe.transfer.invert import invert_text, invert_texts

TEXTS = ["a striped orange ring", "a dotted blue diamond", "an outlined pink triangle", "a solid orange hexagon",
         "a solid green cross", "a striped purple circle", "a dotted red square", "an outlined yellow star",
         "a solid cyan ring", "a striped gray heart", "a dotted white arrow"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", help="demo (the shipped demo CLIP) or an open_clip architecture")
    parser.add_argument("--concepts", type=int, default=11, help="concepts inverted (texts cycle)")
    parser.add_argument("--samples", type=int, default=10, help="images per concept (paper: 10)")
    parser.add_argument("--steps", type=int, default=50, help="inversion steps per run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def build(name: str, device: str):
    """The shipped demo CLIP, or a random-init open_clip architecture (no download)."""
    if name == "demo":
        from ktpipe.demo.shipped import SHIPPED

        return load_model("demo", "ktpipe-demo", str(SHIPPED / "demo"), device)
    torch.manual_seed(0)
    return load_model("open_clip", name, None, device)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.model, args.device)
    texts = [TEXTS[i % len(TEXTS)] for i in range(args.concepts)]
    seeds = list(range(args.concepts))
    cfg = InvertParams(steps=args.steps, samples=args.samples, lr=0.1, affine_p=1.0, tv_weight=0.05)
    invert_text(model, texts[0], InvertParams(steps=2, samples=args.samples), 0, progress=False)  # warm-up

    def timed(fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    alone, alone_s = timed(lambda: torch.stack([invert_text(model, t, cfg, s, progress=False)[0]
                                                for t, s in zip(texts, seeds)]))
    batched, batched_s = timed(lambda: invert_texts(model, texts, cfg, seeds, progress=False)[0])
    images = args.concepts * args.samples * args.steps
    print(f"model {args.model} ({model.image_size} px), {args.concepts} concepts x {args.samples} samples x "
          f"{args.steps} steps on {args.device} ({torch.get_num_threads()} threads)")
    print(f"{'mode':<22}{'seconds':>9}{'images/s':>11}")
    print(f"{'one concept at a time':<22}{alone_s:>9.2f}{images / alone_s:>11.1f}")
    print(f"{'all concepts batched':<22}{batched_s:>9.2f}{images / batched_s:>11.1f}")
    print(f"speed-up {alone_s / batched_s:.2f}x; largest pixel difference {float((alone - batched).abs().max()):.2e}")


if __name__ == "__main__":
    main()
