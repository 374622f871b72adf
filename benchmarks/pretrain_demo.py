"""Seconds per step of demo pretraining, and how a step splits between making the batch and the model.

    python benchmarks/pretrain_demo.py                    # 40 steps at the machine's thread count
    python benchmarks/pretrain_demo.py --threads 1 2 --steps 60

Runs the pretraining step of the packaged demo world (`params.yaml`'s `pretrain` section) from
scratch, without saving. It times the stage's own loop (`ktpipe.demo.pretrain.pretrain`) with and
without `--steps` extra steps, then separately the batch making (drawing captions and made-up
names, rendering) of as many steps; the model's share (tokenizing, forward, backward, AdamW) is
the difference.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from ktpipe.concepts import load_concepts_file, world_concepts
from ktpipe.params import load_params
from ktpipe.demo.pretrain import image_batch, name_batch, pretrain
from ktpipe.templates import load_templates
from ktpipe.demo.world import load_world

WARM_STEPS = 5


def measure(params_path: Path, threads: int, steps: int) -> dict:
    """Time `ktpipe.demo.pretrain.pretrain` itself (the stage's loop) for WARM_STEPS and for
    WARM_STEPS + `steps` steps; the difference is `steps` whole steps, without model build."""
    torch.set_num_threads(threads)
    params = load_params(params_path)
    cfg, size = params.pretrain, params.world.image_size
    world = load_world(concepts=world_concepts(load_concepts_file(Path(params.concepts.file))))
    templates = load_templates(params.evaluate.templates)

    def seconds(n: int) -> float:
        start = time.perf_counter()
        pretrain(world, templates, dataclasses.replace(cfg, steps=n), params.seed, size, progress=False)
        return time.perf_counter() - start

    per_step = (seconds(WARM_STEPS + steps) - seconds(WARM_STEPS)) / steps
    rng = np.random.default_rng(params.seed)
    start = time.perf_counter()
    for _ in range(steps):
        image_batch(world, templates, cfg, rng, size)
        if cfg.name_objective:
            name_batch(world, templates, cfg, rng)
    per_batch = (time.perf_counter() - start) / steps
    return {"threads": threads, "seconds_per_step": round(per_step, 4), "batch_making_s": round(per_batch, 4),
            "model_s": round(per_step - per_batch, 4), "projected_s": round(per_step * cfg.steps, 1),
            "steps": cfg.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--steps", type=int, default=40, help="timed steps (beyond 5 warm-up steps)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    print(f"demo pretraining step, torch {torch.__version__}, {args.steps} timed steps")
    print(f"{'threads':>7} {'s/step':>7} {'batch s':>8} {'model s':>8} {'all steps s':>11}")
    rows = []
    for threads in args.threads:
        row = measure(args.params, threads, args.steps)
        rows.append(row)
        print(f"{threads:>7} {row['seconds_per_step']:>7.3f} {row['batch_making_s']:>8.3f} {row['model_s']:>8.3f} "
              f"{row['projected_s']:>11.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
