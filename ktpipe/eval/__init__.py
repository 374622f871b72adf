"""Evaluation: every set of `evaluate.sets` runs the task its `task:` key names, from `TASKS`.

A task (ktpipe.eval.base.Task) reads a set's records and returns flat metrics; `run_evaluate`
writes one JSON per model with every set's metrics nested as `<set>.<task>.<metric>`, so
`dvc exp show` and the report read any task the same way. A new task is one module here and one
entry of `TASKS`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

from ktpipe import distributed
from ktpipe.concepts import ConceptText, read_concepts
from ktpipe.datasets import Manifest, load_eval_set, normalize_class
from ktpipe.errors import warn
from ktpipe.eval.base import Task, TaskInput, split_result
from ktpipe.eval.captioning import Captioning
from ktpipe.eval.classification import ZeroShotClassification
from ktpipe.eval.embeddings import DEFAULT_STORE, EmbeddingCache
from ktpipe.eval.retrieval import Retrieval, concept_pattern
from ktpipe.eval.segmentation import Segmentation
from ktpipe.io import atomic_dir, write_json
from ktpipe.params import Params, ParamsError
from ktpipe.precision import autocast, compile_towers
from ktpipe.store import files_digest, model_digest, record_digest
from ktpipe.templates import load_templates

BASELINE = "baseline"  # the model before transfer, evaluated beside every recipe
TASKS: dict[str, Task] = {task.name: task for task in (ZeroShotClassification(), Retrieval(), Captioning(),
                                                       Segmentation())}


def get_task(name: str, set_name: str) -> Task:
    """The task a set names, with an error naming the set and the known tasks."""
    if name not in TASKS:
        raise ParamsError(f"params key 'evaluate.sets.{set_name}.task': unknown task {name!r}; "
                          f"known tasks: {sorted(TASKS)}")
    return TASKS[name]


def check_records(task: Task, manifest: Manifest, set_name: str) -> None:
    """A task reads one record kind; a set of another kind is an error naming both."""
    if manifest.kind != task.record_kind:
        raise ParamsError(f"evaluation set {set_name!r} holds {manifest.kind} images, but its task {task.name!r} "
                          f"reads {task.record_kind} ones")


def unevaluated_concepts(concepts: list[ConceptText], sets: dict[str, Manifest]) -> list[str]:
    """Concepts that no evaluation set holds images of (as a class, or named in a caption):
    trained on, never scored."""
    classes = {normalize_class(c) for manifest in sets.values() for c in manifest.classes}
    captions = [c for manifest in sets.values() if manifest.kind == "captioned"
                for record in manifest.records for c in record.captions]

    def evaluated(concept: ConceptText) -> bool:
        if {normalize_class(concept.name), normalize_class(concept.text_name)} & classes:
            return True
        pattern = concept_pattern(concept)
        return any(pattern.search(caption) for caption in captions)

    return [c.name for c in concepts if not evaluated(c)]


def load_evaluated_model(params: Params, model: str, model_dir: Path):
    """The baseline as params `model` names it, or a recipe's fine-tuned checkpoint folder."""
    from ktpipe.models import load_base_model, load_checkpoint  # the backends import only here

    if model == BASELINE:
        return load_base_model(params.model)
    params.recipe(model)  # an unknown name is an error naming the recipes
    return load_checkpoint(params.model, model_dir)


def outputs_dir(out_path: Path) -> Path:
    """The folder beside a model's metrics JSON where tasks write per-item files
    (metrics/eval/paper.json -> metrics/eval/paper/; a path without a suffix gets `_items`)."""
    path = Path(out_path)
    return path.with_suffix("") if path.suffix else path.with_name(f"{path.name}_items")


def task_inputs(params: Params, sets: dict[str, Manifest], concepts: list[ConceptText],
                outputs: Path | None = None, cache: EmbeddingCache | None = None) -> dict[str, TaskInput]:
    """Set name -> what its task reads (records, concepts, templates, candidate classes of other sets,
    the evaluated model's embedding cache)."""
    inputs = {}
    for name, spec in params.used_sets().items():
        extra = [c for other in spec.extra_classes for c in sets[other].classes]
        templates = load_templates(spec.templates or params.evaluate.templates)
        inputs[name] = TaskInput(name, sets[name], spec, concepts, templates, extra, params.evaluate, outputs, sets,
                                 cache)
    return inputs


def model_key(params: Params, model: str, model_dir: Path) -> str:
    """The digest of the evaluated model's weights: the base model's identity (params and local files),
    or a recipe's checkpoint files."""
    if model == BASELINE:
        return model_digest(params.model)
    folder = Path(model_dir)
    return record_digest({"model": model_digest(params.model),
                          "checkpoint": files_digest([p for p in folder.rglob("*") if p.is_file()], folder)})


def evaluate_sets(network, inputs: dict[str, TaskInput], tasks: dict[str, Task], concepts: list[ConceptText],
                  precision: str) -> tuple[dict, dict, dict]:
    """Every set's task on one model: metrics, summary and notes by set name."""
    metrics, summary, notes = {}, {}, {}
    device = next(network.module.parameters()).device
    for name, data in inputs.items():
        task = tasks[name]
        with autocast(precision, device):
            found, notes[name] = split_result(task.evaluate(network, data))
        metrics[name] = {task.name: found}
        summary[name] = {task.name: task.summary(found, concepts)}
    return metrics, summary, notes


def evaluate_wise(params: Params, tuned, tuned_key: str, sets: dict[str, Manifest], concepts: list[ConceptText],
                  tasks: dict[str, Task], store: str | Path | None) -> dict[str, dict]:
    """WiSE-FT (ktpipe.transfer.wise): the fine-tuned model with its weights at each alpha of
    `evaluate.wise_alphas` between the base model's (0) and its own (1), on the report's target and
    retention sets (`report.target_set`, `report.retention_set`; every set when neither is named);
    alpha (as written, `%g`) -> {metrics, summary}. No per-item files; image embeddings in the store
    under the alpha's own key."""
    from ktpipe.transfer.wise import load_wise

    named = {params.report.target_set, params.report.retention_set} - {None}
    network = load_evaluated_model(params, BASELINE, Path())  # takes each alpha's weights in turn
    base = {key: value.clone() for key, value in network.module.state_dict().items()}
    compile_towers(network, params.evaluate.compile)
    found = {}
    for alpha in params.evaluate.wise_alphas:
        load_wise(network, base, tuned.module.state_dict(), alpha)
        cache = EmbeddingCache(record_digest({"model": tuned_key, "wise_alpha": alpha}) if store else None, store,
                               params.evaluate.precision)
        inputs = {name: data for name, data in task_inputs(params, sets, concepts, None, cache).items()
                  if not named or name in named}
        metrics, summary, _ = evaluate_sets(network, inputs, tasks, concepts, params.evaluate.precision)
        found[f"{alpha:g}"] = {"metrics": metrics, "summary": summary}
    return found


def run_evaluate(params: Params, model: str, model_dir: Path, eval_dir: Path, concepts_dir: Path,
                 out_path: Path, store: str | Path | None = DEFAULT_STORE) -> dict:
    """Evaluate one model (`baseline` or a recipe) on every evaluation set with the set's task;
    write and return {model, params, tasks, metrics: {set: {task: {...}}}, summary, unevaluated},
    plus `notes: {set: [...]}` when a task left notes. Class prompts are encoded once per model, and
    image embeddings kept in `store` (ktpipe.eval.embeddings; None: none kept). A recipe's model is also
    evaluated at each alpha of `evaluate.wise_alphas` (WiSE-FT, `wise: {alpha: {metrics, summary}}`). Tasks' per-item files
    go to the folder `outputs_dir(out_path)`, written whole (empty when no task writes any: it is a
    DVC output) or, on an error, not at all."""
    concepts = read_concepts(concepts_dir, params.concepts.names)
    tasks = {name: get_task(spec.task, name) for name, spec in params.used_sets().items()}
    sets = {name: load_eval_set(eval_dir, name) for name in params.used_sets()}
    for name, task in tasks.items():
        check_records(task, sets[name], name)
    unevaluated = unevaluated_concepts(concepts, sets)
    for name in unevaluated:
        warn(f"concept {name!r} is in no evaluation set (evaluate.sets): it is inverted and trained on but "
             "never scored; the report lists it as not evaluated")
    network = load_evaluated_model(params, model, Path(model_dir))
    compile_towers(network, params.evaluate.compile)
    precision = params.evaluate.precision
    key = model_key(params, model, Path(model_dir))
    cache = EmbeddingCache(key if store else None, store, precision)
    # over several processes (ktpipe.distributed) every rank evaluates, sharing out the image batches, and rank 0 writes
    with atomic_dir(outputs_dir(out_path)) if distributed.is_main() else contextlib.nullcontext(None) as outputs:
        metrics, summary, notes = evaluate_sets(network, task_inputs(params, sets, concepts, outputs, cache), tasks,
                                                concepts, precision)
    result = {
        "model": model, "checkpoint": None if model == BASELINE else str(model_dir),
        "params": {"evaluate": dataclasses.asdict(params.evaluate), "model": dataclasses.asdict(params.model)},
        "tasks": {name: task.name for name, task in tasks.items()},
        "metrics": metrics, "summary": summary, "unevaluated": unevaluated,
    }
    if any(notes.values()):
        result["notes"] = {name: left for name, left in notes.items() if left}
    if model != BASELINE and params.evaluate.wise_alphas:
        result["wise"] = evaluate_wise(params, network, key, sets, concepts, tasks, store)
    if not distributed.is_main():
        return result
    write_json(out_path, result)
    if cache.reused_images:
        print(f"{model}: embeddings of {cache.reused_images} images reused from {store}", file=sys.stderr)
    return result
