"""The forgetting trade-off: the Pareto front of hand-made runs, the best target at a kept share of
the base model's retention (boundary and ties), its Markdown table, the figure and the CSV."""
from __future__ import annotations

import csv

from ktpipe.report.tradeoff import (
    TradeoffPoint,
    best_at_retention,
    pareto_front,
    save_tradeoff_figure,
    tradeoff_table,
    write_tradeoff_csv,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def point(label: str, target: float, retention: float, recipe: str = "paper", setting: float | None = None):
    return TradeoffPoint(label=label, recipe=recipe, target=target, retention=retention, setting=setting)


# The paper's Table 1 shape: a base model at 58.1% ImageNet, runs that learn more as they forget more.
TABLE_RUNS = [
    point("paper lr=1e-05", 0.60, 0.575, setting=1e-5),
    point("paper lr=3e-05", 0.90, 0.540, setting=3e-5),
    point("paper lr=5e-05", 0.95, 0.423, setting=5e-5),
    point("wise alpha=0.5", 0.85, 0.560, recipe="wise", setting=0.5),
]


def test_pareto_front_keeps_undominated_points_and_duplicates():
    runs = [
        point("high target", 0.9, 0.5),
        point("balanced", 0.6, 0.8),
        point("dominated", 0.5, 0.7),  # below "balanced" in both
        point("balanced twin", 0.6, 0.8),  # equal to a front point: stays
        point("same target less retention", 0.9, 0.4),  # ties "high target" on target, loses on retention
        point("retention only", 0.3, 0.95),  # worst target, best retention: on the front
    ]
    front = pareto_front(runs)
    assert [p.label for p in front] == ["retention only", "balanced", "balanced twin", "high target"]
    assert pareto_front([]) == []


def test_best_at_retention_boundary_and_nothing_qualifying():
    runs = [
        point("at the boundary", 0.70, 0.8019),  # exactly 99% of 0.81 (0.99 * 0.81 rounds to 0.8019000000000001)
        point("just below", 0.95, 0.8018),
        point("keeps all", 0.50, 0.81),
    ]
    best = best_at_retention(runs, base_retention=0.81)  # default shares (0.95, 0.99)
    assert list(best) == [0.95, 0.99]
    assert best[0.95].label == "just below"
    assert best[0.99].label == "at the boundary"
    beyond = best_at_retention(runs, 0.81, shares=(1.0, 1.1))
    assert beyond[1.0].label == "keeps all"
    assert beyond[1.1] is None


def test_best_at_retention_ties_go_to_retention_then_label():
    same_target = [point("less kept", 0.8, 0.70), point("more kept", 0.8, 0.75)]
    assert best_at_retention(same_target, 0.7, shares=(0.9,))[0.9].label == "more kept"
    identical = [point("b run", 0.8, 0.75), point("a run", 0.8, 0.75)]
    assert best_at_retention(identical, 0.7, shares=(0.9,))[0.9].label == "a run"
    assert best_at_retention(identical[::-1], 0.7, shares=(0.9,))[0.9].label == "a run"


def test_tradeoff_table_lines():
    assert tradeoff_table(TABLE_RUNS, base_retention=0.581, shares=(0.9, 0.95, 0.99)) == [
        "| Retention kept | Best target | Its retention | Point |",
        "|---|---:|---:|---|",
        "| retention >= 90% of the base model's (58.1%) | 90.0% | 54.0% | paper lr=3e-05 |",
        "| retention >= 95% of the base model's (58.1%) | 85.0% | 56.0% | wise alpha=0.5 |",
        "| retention >= 99% of the base model's (58.1%) | none | - | - |",
    ]


def test_figure_is_a_png_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "figures" / "tradeoff.png"
    save_tradeoff_figure(TABLE_RUNS, path, base=(0.581, 0.0), chance=0.001)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 1000
    assert sorted(p.name for p in path.parent.iterdir()) == ["tradeoff.png"]


def test_csv_round_trips(tmp_path):
    path = tmp_path / "tradeoff.csv"
    runs = TABLE_RUNS + [point("no sweep", 1 / 3, 2 / 3, recipe="ours")]
    write_tradeoff_csv(runs, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tradeoff.csv"]
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["recipe", "label", "setting", "target", "retention"]
    read = [TradeoffPoint(label=r["label"], recipe=r["recipe"], target=float(r["target"]),
                          retention=float(r["retention"]), setting=float(r["setting"]) if r["setting"] else None)
            for r in rows]
    assert read == runs
