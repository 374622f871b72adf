"""Evaluation tasks: one module each, same signature, dispatched through `TASKS`.

Each task is `evaluate(model, data, concepts, params, progress) -> dict[str, float]`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from ktpipe.captions import read_concepts
from ktpipe.eval import classification
from ktpipe.io import write_json
from ktpipe.models import load_base_model, load_checkpoint
from ktpipe.params import Params

SPLITS = ("val", "test")  # val picks the learning rate; test is only reported

TASKS: dict[str, Callable[..., dict[str, float]]] = {
    "zeroshot_classification": classification.evaluate,
}


def run_task(task: str, *args, **kwargs) -> dict[str, float]:
    """Run a task by name, with a clear error for unknown names."""
    if task not in TASKS:
        raise ValueError(f"unknown evaluation task {task!r}; known tasks: {sorted(TASKS)}")
    return TASKS[task](*args, **kwargs)


def write_result(path: Path, task: str, dataset: str, model: str, params: dict, metrics: dict[str, float]) -> None:
    """The one JSON schema every task writes."""
    record = {"task": task, "dataset": dataset, "model": model, "params": params, "metrics": metrics}
    write_json(path, record)


def run_evaluate(params: Params, tag: str, checkpoint: Path | None, data_root: Path,
                 captions_dir: Path, out_path: Path) -> dict[str, float]:
    """Zero-shot classification on data_root/val and data_root/test; one JSON in the shared schema.

    `checkpoint` None evaluates the model before transfer (params.model).
    """
    concepts = read_concepts(captions_dir, params.concepts)
    model = load_base_model(params.model) if checkpoint is None else load_checkpoint(params.model, checkpoint)
    metrics: dict[str, float] = {}
    for split in SPLITS:
        found = run_task("zeroshot_classification", model, Path(data_root) / split, concepts, params.evaluate)
        metrics.update({f"{split}_{k}": v for k, v in found.items()})
    run_params = {**dataclasses.asdict(params.evaluate), **dataclasses.asdict(params.model),
                  "checkpoint": str(checkpoint) if checkpoint else None}
    write_result(out_path, "zeroshot_classification", str(data_root), tag, run_params, metrics)
    return metrics
