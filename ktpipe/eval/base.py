"""The evaluation-task interface: what a task reads, the flat metrics it returns, how the report
shows them. A task is one module under `ktpipe/eval/` and one entry of `ktpipe.eval.TASKS`; an
evaluation set picks it with its `task:` key, and its metrics land under `<set>.<task>.<metric>`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ktpipe.concepts import ConceptText
    from ktpipe.datasets import Manifest
    from ktpipe.eval.embeddings import EmbeddingCache
    from ktpipe.params import DatasetParams, EvaluateParams


@dataclass(frozen=True)
class TaskInput:
    """Everything a task reads for one evaluation set."""

    set_name: str
    manifest: Manifest  # the set's records, of the kind the task reads
    spec: DatasetParams  # the set's params entry
    concepts: list[ConceptText]  # the experiment's concepts: names, roles, descriptions
    templates: list[str]  # prompt templates ('{}' is the class name)
    extra_classes: list[str]  # classes of the sets named in the set's `extra_classes`
    params: EvaluateParams
    outputs: Path | None = None  # folder for the task's per-item files (generated captions), or None: none written
    sets: dict[str, Manifest] = field(default_factory=dict)  # every loaded set by name (segmentation's hyper_opt
    # searches on another set's images)
    cache: EmbeddingCache | None = None  # the evaluated model's embeddings, shared by its sets (None: none kept)


@dataclass(frozen=True)
class TaskResult:
    """A task's flat metrics with notes a reader must see beside them (a metric that could not be
    computed on this machine, and why). `evaluate` returns one, or the plain metrics dict."""

    metrics: dict[str, float]
    notes: tuple[str, ...] = ()  # one sentence each; run_evaluate writes them under `notes.<set>`


def split_result(found: dict[str, float] | TaskResult) -> tuple[dict[str, float], list[str]]:
    """(metrics, notes) of what a task's `evaluate` returned."""
    if isinstance(found, TaskResult):
        return found.metrics, list(found.notes)
    return found, []


class Task(Protocol):
    """One evaluation task (classification, retrieval, captioning, segmentation)."""

    name: str  # registry key, and the <task> of `<set>.<task>.<metric>`
    record_kind: str  # the manifest kind it reads: labeled, captioned or masked

    def evaluate(self, model: Any, data: TaskInput, progress: bool = True) -> dict[str, float] | TaskResult:
        """Run `model` on the set; flat `metric -> value` (with notes: a TaskResult). The model is
        asked for capabilities (ktpipe.models.base), never for its kind."""

    def summary(self, metrics: dict[str, float], concepts: list[ConceptText]) -> dict[str, float]:
        """The few numbers per model that the stage prints and `dvc exp show` lists; `target`
        and `retention` when the task has them (the report's headline uses those two)."""

    def report_table(self, results: dict[str, dict[str, float]], concepts: list[ConceptText]) -> list[str]:
        """Markdown lines for one set: `results` maps model ('baseline' first, then recipes) to
        this set's metrics."""


@runtime_checkable
class ReportsItems(Protocol):
    """A task whose report section also shows items from the per-item files it wrote
    (TaskInput.outputs), such as generated captions."""

    def report_items(self, set_name: str, folders: dict[str, Path], concepts: list[ConceptText],
                     report_dir: Path) -> list[str]:
        """Markdown lines for one set: `folders` maps model ('baseline' first, then recipes) to
        the outputs folder its evaluation wrote; links are relative to `report_dir`."""


def pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal, for report tables; '-' when missing or NaN."""
    return "-" if value is None or value != value else f"{100 * value:.1f}%"
