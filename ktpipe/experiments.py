"""Tables across DVC experiments: accuracy against learning rate, and mean over seeds.

Reads what `dvc exp show` lists (params and `reports/metrics.json`), so its numbers come from
pipeline runs only. Used by `ktpipe experiments`.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ktpipe.errors import KtpipeError
from ktpipe.report.tradeoff import TradeoffPoint, pareto_front, tradeoff_table

LR = "params.yaml:lr"
SEED = "seed"


def load_experiments(repo: str | Path = ".") -> pd.DataFrame:
    """One row per finished experiment (and the workspace), columns as `dvc exp show` names them."""
    import dvc.api

    rows = [r for r in dvc.api.exp_show(repo=str(repo)) if r.get("State") in ("Success", None)]
    if not rows:
        raise KtpipeError(f"no finished DVC experiments found in {repo}")
    frame = pd.DataFrame(rows)
    if LR not in frame or not any(str(c).startswith("headline.") for c in frame.columns):
        raise KtpipeError("experiments lack params.yaml:lr or reports/metrics.json: run `dvc repro` first")
    return frame.drop_duplicates(subset=[c for c in frame.columns if c not in ("Experiment", "rev", "typ",
                                                                               "Created", "parent", "Executor")])


def metric_columns(frame: pd.DataFrame, split: str) -> list[str]:
    """The split's metric columns, baseline first."""
    return [c for c in frame.columns if c.startswith(f"{split}.")]


def lr_table(frame: pd.DataFrame, seed: int, split: str = "val") -> pd.DataFrame:
    """Target and retention per recipe against learning rate, for one seed."""
    rows = frame[frame[SEED] == seed]
    cols = [c for c in metric_columns(rows, split) if c.endswith((".target", ".retention"))]
    return rows[[LR, *cols]].sort_values(LR).drop_duplicates(subset=[LR]).set_index(LR)


def seed_table(frame: pd.DataFrame, lr: float, split: str = "test") -> pd.DataFrame:
    """Per seed and mean ± std over seeds, at one learning rate."""
    rows = frame[(frame[LR] - lr).abs() < 1e-12].drop_duplicates(subset=[SEED])
    rows = rows.set_index(rows[SEED].astype(int)).sort_index()
    if rows.empty:
        raise KtpipeError(f"no finished experiment has lr = {lr}")
    table = rows[metric_columns(rows, split)].astype(float)
    summary = pd.DataFrame({"mean": table.mean(), "std": table.std(ddof=0)}).T
    return pd.concat([table, summary])


def lr_curves(table: pd.DataFrame) -> dict[str, list[tuple[float, float, float]]]:
    """recipe -> (lr, target, retention) points, from an lr table (`lr_table`); the model before
    transfer does not depend on lr and is left out."""
    recipes = dict.fromkeys(c.split(".")[-2] for c in table.columns if c.endswith(".target"))
    curves = {}
    for recipe in recipes:
        if recipe == "baseline":
            continue
        target = next(c for c in table.columns if c.endswith(f".{recipe}.target"))
        retention = next((c for c in table.columns if c.endswith(f".{recipe}.retention")), None)
        if retention is not None:
            curves[recipe] = [(float(lr), float(row[target]), float(row[retention])) for lr, row in table.iterrows()]
    return curves


def sweep_points(curves: dict[str, list[tuple[float, float, float]]]) -> list[TradeoffPoint]:
    """Every recipe at every learning rate of the sweep (`lr_curves`), as trade-off points."""
    return [TradeoffPoint(f"{recipe} lr={lr:g}", recipe, target, retention, lr)
            for recipe, curve in curves.items() for lr, target, retention in curve]


def baseline_retention(table: pd.DataFrame) -> float | None:
    """The model before transfer's retention in an lr table (the same at every lr), or None."""
    column = next((c for c in table.columns if c.endswith(".baseline.retention")), None)
    return None if column is None else float(table[column].iloc[0])


def tradeoff_lines(curves: dict[str, list[tuple[float, float, float]]], base_retention: float | None,
                   figure: str) -> list[str]:
    """Markdown for the sweep's trade-off: its figure (`figure`, relative to the Markdown), the Pareto
    front and, when the base model's retention is known, the best target kept at 95% and 99% of it."""
    points = sweep_points(curves)
    front = ", ".join(f"`{p.label}`" for p in pareto_front(points))
    return [f"![Target against retention across the learning-rate sweep]({figure})", "",
            f"Every recipe at every learning rate; Pareto front: {front}.", "",
            *(tradeoff_table(points, base_retention) if base_retention is not None else []), ""]


def render(frame: pd.DataFrame, lr: float, seed: int, test_set: str = "test", val_set: str = "val",
           figure: str | None = None, tradeoff: list[str] = ()) -> str:
    """Markdown with the seed table (on `test_set`) and the lr table (on `val_set`), the sweep's
    trade-off (`tradeoff_lines`) and the lr curve's image `figure` (a path relative to the Markdown
    file) when given."""
    seeds = seed_table(frame, lr, test_set)
    transposed = seeds.T.map(lambda v: f"{100 * v:.1f}%")
    return "\n".join([
        "# Experiments",
        "",
        f"## `{test_set}` over seeds at lr {lr:g} ({len(seeds) - 2} seeds)",
        "",
        "Rows: set.task.model.metric; `target` pools the novel concepts, `retention` the known ones,",
        "concept names give that novel concept's accuracy.",
        "",
        transposed.to_markdown(),
        "",
        f"## `{val_set}` against learning rate (seed {seed})",
        "",
        *tradeoff,
        *([f"![Target and retention against learning rate]({figure})", ""] if figure else []),
        lr_table(frame, seed, val_set).map(lambda v: f"{100 * v:.1f}%").to_markdown(),
        "",
    ])
