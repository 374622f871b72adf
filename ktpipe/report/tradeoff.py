"""The forgetting trade-off of fine-tuning recipes: how much a run learns of the novel concepts
(target accuracy) against how much it keeps of the known ones (retention accuracy).

The paper's Table 1 shows the tension: fine-tuning ViT-B/32 at lr 3e-5 teaches it the moongate to
90% while its ImageNet accuracy falls from 58.1% to 54.0%, and at lr 5e-5 to 42.3%. A recipe is
only better than another if it learns more without forgetting more, so runs are compared on their
Pareto front and on the best target each reaches while keeping a share of the base model's
retention. Accuracies are fractions in [0, 1] throughout; tables and figures show percentages.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ktpipe.eval.base import pct  # noqa: E402
from ktpipe.io import write_text  # noqa: E402
from ktpipe.report.figures import save  # noqa: E402

SHARES = (0.95, 0.99)  # default shares of the base model's retention a run must keep
EPS = 1e-9  # slack in the retention threshold, so 0.95 * 0.8 = 0.7600000000000001 admits 0.76
MARKERS = "osD^vP*Xhp"
CSV_COLUMNS = ("recipe", "label", "setting", "target", "retention")


@dataclass(frozen=True)
class TradeoffPoint:
    """One fine-tuning run: its accuracies after transfer (fractions in [0, 1])."""

    label: str  # what the run is called in tables and legends ("paper lr=0.002", "wise alpha=0.5")
    recipe: str  # the recipe it ran; one colour and marker per recipe in the figure
    target: float  # accuracy on the novel concepts
    retention: float  # accuracy on the known concepts
    setting: float | None = None  # the swept value (lr, alpha), None when the run sweeps nothing


def dominates(a: TradeoffPoint, b: TradeoffPoint) -> bool:
    """Whether `a` is at least as good as `b` in both accuracies and strictly better in one."""
    return (a.target >= b.target and a.retention >= b.retention
            and (a.target > b.target or a.retention > b.retention))


def pareto_front(points: list[TradeoffPoint]) -> list[TradeoffPoint]:
    """The points no other point dominates (duplicates of a front point all stay), by retention
    descending then target ascending."""
    front = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda p: (-p.retention, p.target))


def best_at_retention(points: list[TradeoffPoint], base_retention: float,
                      shares: tuple[float, ...] = SHARES) -> dict[float, TradeoffPoint | None]:
    """For each share, the point with the highest target among those keeping retention >= share *
    `base_retention` (ties: higher retention, then label in alphabetical order); None if none does."""
    best: dict[float, TradeoffPoint | None] = {}
    for share in shares:
        kept = [p for p in points if p.retention >= share * base_retention - EPS]
        best[share] = min(kept, key=lambda p: (-p.target, -p.retention, p.label), default=None)
    return best


def tradeoff_table(points: list[TradeoffPoint], base_retention: float,
                   shares: tuple[float, ...] = SHARES) -> list[str]:
    """Markdown lines: per share of the base model's retention, the best target reached keeping it."""
    lines = ["| Retention kept | Best target | Its retention | Point |", "|---|---:|---:|---|"]
    for share, p in best_at_retention(points, base_retention, shares).items():
        kept = f"retention >= {100 * share:g}% of the base model's ({pct(base_retention)})"
        cells = ("none", "-", "-") if p is None else (pct(p.target), pct(p.retention), p.label)
        lines.append(f"| {kept} | {' | '.join(cells)} |")
    return lines


def save_tradeoff_figure(points: list[TradeoffPoint], path: Path, base: tuple[float, float] | None = None,
                         chance: float | None = None) -> None:
    """Target (y) against retention (x) per run, one colour and marker per recipe (each point labelled
    with its setting, when it has one), the Pareto front as a staircase, the base model's (retention, target) before transfer as a black star, and the
    target's chance level (a fraction) dashed."""
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    colors = plt.get_cmap("tab10")
    for i, recipe in enumerate(dict.fromkeys(p.recipe for p in points)):
        runs = [p for p in points if p.recipe == recipe]
        ax.scatter([100 * p.retention for p in runs], [100 * p.target for p in runs], s=45,
                   color=colors(i % 10), marker=MARKERS[i % len(MARKERS)], label=recipe, zorder=3)
        for p in runs:  # the swept value beside its point (alpha, lr)
            if p.setting is not None:
                ax.annotate(f"{p.setting:g}", (100 * p.retention, 100 * p.target), textcoords="offset points",
                            xytext=(-6, 5), ha="right", fontsize=7, color=colors(i % 10))
    front = pareto_front(points)[::-1]  # retention ascending, so target descending
    if front:
        ax.step([100 * p.retention for p in front], [100 * p.target for p in front], where="pre",
                color="black", lw=1, alpha=0.6, label="Pareto front", zorder=2)
    if base is not None:
        ax.scatter([100 * base[0]], [100 * base[1]], s=160, marker="*", color="black",
                   label="base model (before transfer)", zorder=4)
    if chance is not None:
        ax.axhline(100 * chance, color="grey", ls="--", lw=0.8, label=f"chance {pct(chance)}")
    ax.set(xlim=(-2, 102), ylim=(-2, 102), xlabel="Retention accuracy (known concepts, %)",
           ylabel="Target accuracy (novel concepts, %)", title="Forgetting trade-off of fine-tuning runs")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save(fig, path)


def write_tradeoff_csv(points: list[TradeoffPoint], path: str | Path) -> None:
    """Write the runs as CSV (recipe, label, setting, target, retention; accuracies as fractions,
    setting empty when None) for `dvc plots`, atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in points:
        writer.writerow([p.recipe, p.label, "" if p.setting is None else p.setting, p.target, p.retention])
    write_text(path, buffer.getvalue())
