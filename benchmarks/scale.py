"""The scale benchmark, in one run: inversion one concept at a time against concepts batched (the
demo CLIP and a ViT-B/32), zero-shot evaluation against CLIP_benchmark's on the same model and
images, peak memory of each, and the FLOP utilisation of a ViT-B/32 inversion step.

    pip install -e ".[bench]"                     # CLIP_benchmark, the comparison's only extra
    python benchmarks/scale.py                    # CPU defaults: a few minutes on 2 cores
    python benchmarks/scale.py --device cuda --steps 20 --eval-images 2048 --workers 8 --json scale.json

Every part runs in its own process (spawned), so its peak memory is its own: on a GPU
`torch.cuda.max_memory_allocated`, on the CPU the growth of the process's peak resident memory from
before the model was built. Models: the shipped demo CLIP (32 px) and a random-init open_clip
ViT-B/32 at 224 px (`--pretrained TAG` loads real weights; the compute is the same).

- Inversion (paper Eq. 3, `ktpipe.transfer.invert`): `--concepts` concepts x `--samples` images
  x `--steps` steps, once as one `invert_text` run per concept (`invert.concepts_per_batch: 1`)
  and once as one `invert_texts` batch; images/s = concepts x samples x steps / seconds, after a
  2-step warm-up. Goal on the demo (CPU): batched at least 3x. `--compile inductor` also times
  the batched run with the towers compiled (`invert.compile`), its compile time apart, and prints how
  far its final pixels lie from the plain batched run's.
- Evaluation: zero-shot classification of `--eval-images` 500x375 JPEGs over `--classes` classes x
  `--templates` prompts, from the files to the (N, K) scores, text classifier included: ktpipe's
  `classification.class_scores` against CLIP_benchmark's `zero_shot_classifier` +
  `run_classification` (its DataLoader over a torchvision ImageFolder of the same files with
  open_clip's eval transform), the same batch size and `--workers`. `--precision bf16|fp16` runs
  ktpipe under that autocast and CLIP_benchmark with `amp=True` (autocast's default type).
  The share of images where both pick the same class is printed. Goal: ktpipe at least as fast.
- FLOP utilisation: one steady-state ViT-B/32 inversion step of `--samples` images (forward,
  backward; `torch.utils.flop_counter`: the difference between a 2-step and a 1-step run, so the
  final scoring pass is not counted) divided by its time, against the device's peak: a GPU's
  datasheet figure for the precision (dense), the CPU's measured fp32 matrix-multiply rate at the
  same thread count (a practical peak, stated as such).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing ktpipe
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import write_jpegs  # noqa: E402
from devices import device_name, peak_rss_mib, sync, worker_device  # noqa: E402

TEXTS = ["a striped orange ring", "a dotted blue diamond", "an outlined pink triangle", "a solid orange hexagon",
         "a solid green cross", "a striped purple circle", "a dotted red square", "an outlined yellow star",
         "a solid cyan ring", "a striped gray heart", "a dotted white arrow"]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}.", "a close-up photo of the {c}.", "a {c} in the wild.",
             "a bright photo of a {c}.", "a blurry photo of a {c}.", "a sketch of a {c}.", "art of the {c}."]
CLASSES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray", "stingray",
           "rooster", "hen", "ostrich"]
# Dense peak TFLOP/s from NVIDIA's datasheets (SXM parts; tensor cores for the half types, TF32 off for fp32)
GPU_PEAK_TFLOPS = {"H100": {"fp32": 67.0, "bf16": 989.4, "fp16": 989.4},
                   "H200": {"fp32": 67.0, "bf16": 989.4, "fp16": 989.4},
                   "A100": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--concepts", type=int, default=None, help="concepts inverted (default: demo 11, ViT-B/32 4)")
    parser.add_argument("--samples", type=int, default=10, help="images per concept (paper: 10)")
    parser.add_argument("--steps", type=int, default=None, help="timed inversion steps (default: demo 20, ViT-B/32 2)")
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10, help=f"at most {len(CLASSES)}")
    parser.add_argument("--templates", type=int, default=8, help=f"prompts per class, at most {len(TEMPLATES)}")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes, both evaluations")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--model", default="ViT-B-32",
                        help="open_clip architecture (or local-dir:FOLDER) of the evaluation, the FLOP count and the "
                             "second inversion run")
    parser.add_argument("--pretrained", default=None, help="open_clip tag for --model (default: random init)")
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="also time batched inversion with torch.compile of the towers (invert.compile: "
                             "inductor); its compile time is printed apart")
    parser.add_argument("--parts", nargs="+", default=["invert", "eval", "flops"], choices=("invert", "eval", "flops"))
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    if not 1 <= args.classes <= len(CLASSES) or not 1 <= args.templates <= len(TEMPLATES):
        parser.error(f"--classes must be 1..{len(CLASSES)} and --templates 1..{len(TEMPLATES)}")
    if "eval" in args.parts:
        try:
            import clip_benchmark  # noqa: F401
        except ImportError:
            parser.error("the evaluation comparison needs CLIP_benchmark: pip install clip-benchmark "
                         "(or leave it out: --parts invert flops)")
    return args


# --- in each part's own process ---------------------------------------------------------------------

class PeakMemory:
    """Peak memory of what runs inside: CUDA's allocator peak, or the growth of the process's peak RSS."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        self.start = peak_rss_mib()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            self.mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.mib = peak_rss_mib() - self.start


def build(name: str, device: str, pretrained: str | None = None):
    """The shipped demo CLIP, or an open_clip architecture (random init unless `pretrained`)."""
    import torch

    from ktpipe.models import load_model

    if name == "demo":
        from ktpipe.demo.shipped import SHIPPED

        return load_model("demo", "ktpipe-demo", str(SHIPPED / "demo"), device)
    torch.manual_seed(0)
    return load_model("open_clip", name, pretrained, device)


def invert_part(job: dict) -> dict:
    """Images per second and peak memory of one inversion mode ('alone' or 'batched')."""
    import torch

    from ktpipe.params import InvertParams
    from ktpipe.transfer.invert import invert_text, invert_texts

    device = worker_device(job["threads"], job["device"])
    with PeakMemory(device) as memory:
        model = build(job["model"], device, job["pretrained"])
        texts = [TEXTS[i % len(TEXTS)] for i in range(job["concepts"])]
        seeds = list(range(job["concepts"]))
        backend = job["compile"] if job["mode"] == "compiled" else None
        cfg = InvertParams(steps=job["steps"], samples=job["samples"], precision=job["precision"], compile=backend)
        warm = InvertParams(steps=2, samples=job["samples"], precision=job["precision"], compile=backend)
        start = time.perf_counter()
        if job["mode"] == "alone":
            invert_text(model, texts[0], warm, 0, progress=False)
            run = lambda: [invert_text(model, t, cfg, s, progress=False) for t, s in zip(texts, seeds)]  # noqa: E731
        else:  # batched, or batched and compiled (the warm-up compiles)
            invert_texts(model, texts, warm, seeds, progress=False)
            run = lambda: invert_texts(model, texts, cfg, seeds, progress=False)  # noqa: E731
        sync(device)
        warm_seconds = time.perf_counter() - start
        start = time.perf_counter()
        out = run()
        sync(device)
        seconds = time.perf_counter() - start
    images = job["concepts"] * job["samples"] * job["steps"]
    found = {"seconds": seconds, "warm_up_s": warm_seconds, "images_per_s": images / seconds, "peak_mib": memory.mib,
             "image_size": model.image_size, "device_name": device_name(device), "threads": torch.get_num_threads()}
    if job["compile"] and job["mode"] != "alone":  # the final pixels, to compare compiled and plain
        found["pixels"] = out[0].numpy()
    return found


def write_image_folder(root: Path, classes: int, count: int) -> tuple[list[str], list[int]]:
    """bench.py's `count` 500x375 JPEGs spread over `classes` class folders (torchvision's ImageFolder
    layout; folder k holds class k); returns the paths and labels in ImageFolder's order."""
    flat = root / ".flat"  # emptied and removed below: ImageFolder would take it for a class
    flat.mkdir(parents=True)
    for i, path in enumerate(write_jpegs(flat, count)):
        folder = root / f"{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Path(path).rename(folder / Path(path).name)
    flat.rmdir()
    paths, labels = [], []
    for label in range(classes):  # ImageFolder: classes sorted, then files sorted within each
        for path in sorted((root / f"{label:03d}").iterdir()):
            paths.append(str(path))
            labels.append(label)
    return paths, labels


def eval_part(job: dict) -> dict:
    """Images per second of one zero-shot classification run ('ktpipe' or 'clip_benchmark') over
    the same images, classes and prompts; the predicted classes, for the agreement figure."""
    import torch

    device = worker_device(job["threads"], job["device"])
    classnames, templates = CLASSES[:job["classes"]], TEMPLATES[:job["templates"]]
    with tempfile.TemporaryDirectory() as tmp, PeakMemory(device) as memory:
        paths, labels = write_image_folder(Path(tmp), len(classnames), job["images"])
        model = build(job["model"], device, job["pretrained"])
        model.module.eval()
        if job["runner"] == "ktpipe":
            from ktpipe.eval.classification import class_scores
            from ktpipe.eval.embeddings import EmbeddingCache
            from ktpipe.precision import autocast

            prompts = [tuple(t.format(c=c) for t in templates) for c in classnames]

            def run() -> torch.Tensor:
                with autocast(job["precision"], device):
                    return class_scores(model, tuple(paths), {"name": prompts}, job["batch"], job["workers"],
                                        progress=False, cache=EmbeddingCache(), pin_memory=device.startswith("cuda"))["name"]
            warm = lambda: class_scores(model, tuple(paths[:job["batch"]]), {"name": prompts[:1]}, job["batch"],  # noqa: E731
                                        progress=False)
        else:
            import open_clip
            import torchvision
            from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier

            transform = open_clip.image_transform(model.image_size, is_train=False)
            amp = job["precision"] != "fp32"

            def run() -> torch.Tensor:
                dataset = torchvision.datasets.ImageFolder(tmp, transform=transform)
                loader = torch.utils.data.DataLoader(dataset, batch_size=job["batch"], num_workers=job["workers"],
                                                     pin_memory=device.startswith("cuda"))
                classifier = zero_shot_classifier(model.module, model.tokenizer, classnames, templates, device, amp=amp)
                return run_classification(model.module, classifier, loader, device, amp=amp)[0]
            warm = lambda: model.module.encode_image(torch.zeros(job["batch"], 3, model.image_size,  # noqa: E731
                                                                 model.image_size, device=device))
        with torch.no_grad():
            warm()
        sync(device)
        start = time.perf_counter()
        scores = run()
        sync(device)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": job["images"] / seconds, "peak_mib": memory.mib,
            "predictions": scores.argmax(1).tolist(), "labels": labels}


def cpu_peak_flops() -> float:
    """This CPU's fp32 matrix-multiply rate at torch's thread count (FLOP/s): a practical peak."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < 2.0:
        a @ b
        runs += 1
    return 2 * 2048**3 * runs / (time.perf_counter() - start)


def gpu_peak_flops(name: str, precision: str) -> float | None:
    for key, peaks in GPU_PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision] * 1e12
    return None


def step_flops(model, samples: int, precision: str = "fp32") -> int:
    """FLOPs of one inversion step of `samples` images (augment, forward, backward to the pixels):
    a 2-step run's count less a 1-step run's, so the text target and the final scoring cancel."""
    from torch.utils.flop_counter import FlopCounterMode

    from ktpipe.params import InvertParams
    from ktpipe.transfer.invert import invert_text

    def counted(steps: int) -> int:
        with FlopCounterMode(display=False) as counter:
            invert_text(model, TEXTS[0], InvertParams(steps=steps, samples=samples, precision=precision), 0,
                        progress=False)
        return counter.get_total_flops()

    return counted(2) - counted(1)


def flops_part(job: dict) -> dict:
    """FLOPs and seconds of one steady-state inversion step, and the device's peak."""
    import torch

    from ktpipe.params import InvertParams
    from ktpipe.transfer.invert import invert_text

    device = worker_device(job["threads"], job["device"])
    model = build(job["model"], device, job["pretrained"])
    flops = step_flops(model, job["samples"], job["precision"])
    starts: list[float] = []

    def stamp(module, inputs):
        sync(device)
        starts.append(time.perf_counter())

    hook = model.module.visual.register_forward_pre_hook(stamp)  # one visual forward per step
    try:
        invert_text(model, TEXTS[0], InvertParams(steps=1 + job["steps"], samples=job["samples"],
                                                 precision=job["precision"]), 0, progress=False)
    finally:
        hook.remove()
    gaps = [b - a for a, b in zip(starts, starts[1:])][1:1 + job["steps"]]  # after the warm-up step
    step_s = sum(gaps) / len(gaps)
    name = device_name(device)
    if device.startswith("cuda"):
        peak, peak_source = gpu_peak_flops(name, job["precision"]), f"datasheet, dense {job['precision']}"
    else:
        peak, peak_source = cpu_peak_flops(), f"measured fp32 matmul, {torch.get_num_threads()} threads"
    achieved = flops / step_s
    return {"model": job["model"], "image_size": model.image_size, "step_gflop": flops / 1e9, "step_s": step_s, "achieved_tflops": achieved / 1e12,
            "peak_tflops": None if peak is None else peak / 1e12, "peak_source": peak_source,
            "utilisation": None if peak is None else achieved / peak, "samples": job["samples"]}


# --- the driver ----------------------------------------------------------------------------------------

def in_own_process(fn, job: dict) -> dict:
    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        return pool.apply(fn, (job,))
    finally:
        pool.close()  # let the worker exit on its own (terminate() leaks its semaphores)
        pool.join()


def run(args: argparse.Namespace) -> dict:
    common = {"device": args.device, "threads": args.threads, "precision": args.precision,
              "pretrained": args.pretrained, "model": args.model, "compile": args.compile}
    results: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if "invert" in args.parts:
        results["invert"] = {}
        for model, concepts, steps in (("demo", 11, 20), (args.model, 4, 2)):
            job = {**common, "model": model, "concepts": args.concepts or concepts, "steps": args.steps or steps,
                   "samples": args.samples, "pretrained": args.pretrained if model != "demo" else None}
            names = ("alone", "batched", "compiled") if args.compile else ("alone", "batched")
            modes = {mode: in_own_process(invert_part, {**job, "mode": mode}) for mode in names}
            modes["speedup"] = modes["batched"]["images_per_s"] / modes["alone"]["images_per_s"]
            if args.compile:
                plain, compiled = modes["batched"].pop("pixels"), modes["compiled"].pop("pixels")
                modes["compiled_speedup"] = modes["compiled"]["images_per_s"] / modes["batched"]["images_per_s"]
                modes["compiled_max_pixel_diff"] = float(abs(plain - compiled).max())
            modes.update(concepts=job["concepts"], steps=job["steps"], samples=job["samples"])
            results["invert"][model] = modes
            print_invert(model, modes)
    if "eval" in args.parts:
        job = {**common, "images": args.eval_images, "batch": args.eval_batch, "classes": args.classes,
               "templates": args.templates, "workers": args.workers}
        runs = {runner: in_own_process(eval_part, {**job, "runner": runner}) for runner in ("ktpipe", "clip_benchmark")}
        ours, theirs = runs["ktpipe"], runs["clip_benchmark"]
        agree = sum(a == b for a, b in zip(ours["predictions"], theirs["predictions"])) / len(ours["predictions"])
        results["eval"] = {runner: {k: v for k, v in r.items() if k not in ("predictions", "labels")}
                           for runner, r in runs.items()}
        results["eval"].update(ratio=ours["images_per_s"] / theirs["images_per_s"], same_prediction=agree, **job)
        print_eval(results["eval"])
    if "flops" in args.parts:
        results["flops"] = in_own_process(flops_part, {**common, "samples": args.samples, "steps": args.steps or 2})
        print_flops(results["flops"])
    return results


def print_invert(model: str, r: dict) -> None:
    alone = r["alone"]
    print(f"\ninversion, {model} ({alone['image_size']} px) on {alone['device_name']} ({alone['threads']} threads): "
          f"{r['concepts']} concepts x {r['samples']} samples x {r['steps']} steps")
    print(f"  {'mode':<24}{'seconds':>9}{'images/s':>11}{'peak MiB':>10}")
    for label, key in (("one concept at a time", "alone"), ("all concepts batched", "batched")):
        print(f"  {label:<24}{r[key]['seconds']:>9.2f}{r[key]['images_per_s']:>11.1f}{r[key]['peak_mib']:>10.0f}")
    if "compiled" in r:
        c = r["compiled"]
        print(f"  {'batched, compiled':<24}{c['seconds']:>9.2f}{c['images_per_s']:>11.1f}{c['peak_mib']:>10.0f}"
              f"  (compiling and 2 warm-up steps: {c['warm_up_s']:.1f} s)")
    goal = "  (goal on the demo: at least 3x)" if model == "demo" else ""
    print(f"  batched: {r['speedup']:.2f}x the per-concept images/s{goal}")
    if "compiled" in r:
        print(f"  compiled: {r['compiled_speedup']:.2f}x the plain batched images/s; final pixels within "
              f"{r['compiled_max_pixel_diff']:.1e} of the plain run's")


def print_eval(r: dict) -> None:
    print(f"\nzero-shot classification, {r['model']}: {r['images']} images x {r['classes']} classes x "
          f"{r['templates']} prompts, batch {r['batch']}, {r['workers']} workers, {r['precision']}")
    print(f"  {'runner':<24}{'seconds':>9}{'images/s':>11}{'peak MiB':>10}")
    for runner in ("ktpipe", "clip_benchmark"):
        print(f"  {runner:<24}{r[runner]['seconds']:>9.2f}{r[runner]['images_per_s']:>11.1f}{r[runner]['peak_mib']:>10.0f}")
    print(f"  ktpipe: {r['ratio']:.2f}x CLIP_benchmark's images/s (goal: at least 1x); same class for "
          f"{100 * r['same_prediction']:.1f}% of images")


def print_flops(r: dict) -> None:
    peak = "unknown device peak" if r["peak_tflops"] is None else (
        f"{r['peak_tflops']:.2f} TFLOP/s peak ({r['peak_source']}): {100 * r['utilisation']:.1f}% utilisation")
    print(f"\n{r['model']} ({r['image_size']} px) inversion step, {r['samples']} images: {r['step_gflop']:.1f} GFLOP in {r['step_s']:.3f} s = "
          f"{r['achieved_tflops']:.3f} TFLOP/s; {peak}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
