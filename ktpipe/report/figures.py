"""The report's figures: target against retention before and after transfer, per-concept accuracy,
the inverted images, and accuracy against learning rate across experiments.

Each takes plain numbers (fractions in [0, 1]) gathered by the report, so the drawing code is apart
from where the numbers come from; PNGs are written atomically (a temporary file, then a rename).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ktpipe.concepts import ConceptText  # noqa: E402
from ktpipe.images import load_inversion, make_grid  # noqa: E402

FIGURE_ROWS = 12  # concepts shown in inverted.png (the MSCOCO experiment has 80)


@dataclass(frozen=True)
class TransferPoint:
    """One recipe of one model family: pooled target and retention accuracy before and after."""

    label: str  # "<family>/<recipe>" ("model" is the params file's own model)
    target_before: float
    target_after: float
    retention_before: float
    retention_after: float
    chance: float | None  # 1 / number of classes of the target set (None: unknown)


def save(fig, path: Path, dpi: int = 110) -> None:
    """Write a figure to `path` atomically and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)


def save_transfer_figure(points: list[TransferPoint], path: Path) -> None:
    """Target accuracy against retention accuracy, one arrow per recipe from before (hollow) to
    after transfer (filled), with chance level dashed: up is learning, left is forgetting."""
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    colors = plt.get_cmap("tab10")
    for i, p in enumerate(points):
        color = colors(i % 10)
        ax.annotate("", xy=(100 * p.retention_after, 100 * p.target_after),
                    xytext=(100 * p.retention_before, 100 * p.target_before),
                    arrowprops={"arrowstyle": "->", "color": color, "lw": 1.5})
        ax.scatter([100 * p.retention_before], [100 * p.target_before], s=50, facecolors="none", edgecolors=[color])
        ax.scatter([100 * p.retention_after], [100 * p.target_after], s=50, color=color, label=p.label)
    chances = {round(p.chance, 4) for p in points if p.chance}
    for chance in sorted(chances):
        ax.axhline(100 * chance, color="grey", ls="--", lw=0.8)
        ax.axvline(100 * chance, color="grey", ls="--", lw=0.8)
        ax.text(100 * chance + 1, 100 * chance + 1, f"chance {100 * chance:.1f}%", color="grey", fontsize=7)
    ax.set(xlim=(-2, 102), ylim=(-2, 102), xlabel="Retention accuracy (known concepts, %)",
           ylabel="Target accuracy (novel concepts, %)",
           title="Before (hollow) and after (filled) knowledge transfer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(0.12, 0.5), title="family/recipe", title_fontsize=8)
    fig.tight_layout()
    save(fig, path)


def save_concept_figure(bars: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """Grouped bars: per novel concept (outer key), one bar per series (inner key, in order)."""
    concepts = list(bars)
    series = list(dict.fromkeys(s for values in bars.values() for s in values))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(concepts) * max(len(series), 1) * 0.45 + 2), 3.6))
    colors = plt.get_cmap("tab10")
    for j, name in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(concepts))]
        ys = [100 * bars[c].get(name, float("nan")) for c in concepts]
        ax.bar(xs, ys, width=width, label=name, color=colors(j % 10))
    ax.set_xticks(range(len(concepts)), concepts)
    ax.set(ylim=(0, 105), ylabel="Accuracy (%)", title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(len(series), 4), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    save(fig, path)


def save_lr_figure(curves: dict[str, list[tuple[float, float, float]]], path: Path, title: str) -> None:
    """Target (solid) and retention (dashed) against learning rate, one colour per recipe; `curves`
    maps a recipe to its (lr, target, retention) points."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = plt.get_cmap("tab10")
    for i, (recipe, points) in enumerate(curves.items()):
        points = sorted(points)
        lrs = [p[0] for p in points]
        ax.plot(lrs, [100 * p[1] for p in points], "o-", color=colors(i % 10), label=f"{recipe}: target")
        ax.plot(lrs, [100 * p[2] for p in points], "s--", color=colors(i % 10), label=f"{recipe}: retention")
    ax.set_xscale("log")
    ax.set(ylim=(-2, 102), xlabel="Fine-tuning learning rate", ylabel="Accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)


def save_inversion_figure(inverted_dir: Path, concepts: list[ConceptText], path: Path) -> None:
    """One row of inverted images per concept (the first FIGURE_ROWS), labelled with its description."""
    shown = concepts[:FIGURE_ROWS]
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 1.1 * len(shown) + 0.4), squeeze=False)
    for ax, concept in zip(axes[:, 0], shown):
        grid = make_grid(load_inversion(Path(inverted_dir) / concept.name), columns=10)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{concept.name} ({concept.role}): {concept.description[:140]}", fontsize=8, loc="left")
    fig.tight_layout()
    save(fig, path)
