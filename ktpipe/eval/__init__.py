"""Evaluation tasks: one module each, same signature, dispatched through `TASKS`.

Each task is `evaluate(model, manifest, extra_classes, concepts, templates, params, progress)`
and returns a flat `dict[str, float]`; `run_evaluate` writes them in one JSON schema.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from ktpipe.captions import ConceptText, read_concepts
from ktpipe.datasets import Manifest, normalize_class
from ktpipe.errors import warn
from ktpipe.eval import classification
from ktpipe.evalsets import load_eval_set
from ktpipe.io import write_json
from ktpipe.models import load_base_model, load_checkpoint
from ktpipe.params import Params, ParamsError
from ktpipe.templates import load_templates

TASKS: dict[str, Callable[..., dict[str, float]]] = {
    "zeroshot_classification": classification.evaluate,
}


def run_task(task: str, *args, **kwargs) -> dict[str, float]:
    """Run a task by name, with a clear error for unknown names."""
    if task not in TASKS:
        raise ParamsError(f"unknown evaluation task {task!r}; known tasks: {sorted(TASKS)}")
    return TASKS[task](*args, **kwargs)


def write_result(path: Path, task: str, dataset: str, model: str, params: dict, metrics: dict[str, float]) -> None:
    """The one JSON schema every task writes."""
    record = {"task": task, "dataset": dataset, "model": model, "params": params, "metrics": metrics}
    write_json(path, record)


def unevaluated_concepts(concepts: list[ConceptText], sets: dict[str, Manifest]) -> list[str]:
    """Concepts that no evaluation set holds images of: trained on, never scored."""
    classes = {normalize_class(c) for manifest in sets.values() for c in manifest.classes}
    return [c.name for c in concepts if not {normalize_class(c.name), normalize_class(c.text_name)} & classes]


def run_evaluate(params: Params, tag: str, checkpoint: Path | None, eval_dir: Path,
                 captions_dir: Path, out_path: Path) -> dict[str, float]:
    """Zero-shot classification on every evaluation set; one JSON with `<set>_<metric>` keys.

    `checkpoint` None evaluates the model before transfer (params.model).
    """
    concepts = read_concepts(captions_dir, params.concepts)
    sets = {name: load_eval_set(eval_dir, name) for name in params.evaluate.sets}
    for name in unevaluated_concepts(concepts, sets):
        warn(f"concept {name!r} is in no evaluation set (evaluate.sets): it is inverted and trained on but "
             "never scored; the report lists it as not evaluated")
    model = load_base_model(params.model) if checkpoint is None else load_checkpoint(params.model, checkpoint)
    metrics: dict[str, float] = {}
    for name, spec in params.evaluate.sets.items():
        extra = [c for other in spec.extra_classes for c in sets[other].classes]
        templates = load_templates(spec.templates or params.evaluate.templates)
        found = run_task("zeroshot_classification", model, sets[name], extra, concepts, templates, params.evaluate)
        metrics.update({f"{name}_{k}": v for k, v in found.items()})
    run_params = {**dataclasses.asdict(params.evaluate), **dataclasses.asdict(params.model),
                  "checkpoint": str(checkpoint) if checkpoint else None}
    write_result(out_path, "zeroshot_classification", str(eval_dir), tag, run_params, metrics)
    return metrics
