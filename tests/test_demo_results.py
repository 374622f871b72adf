"""What the committed demo run must show (reports/metrics.json, written by `dvc repro`; the
committed dvc.lock ties it to the committed code, tests/test_dvc_lock.py): the model before
transfer is near chance on the novel concepts while their descriptions, as prompts, are far
above it; every recipe's target beats its baseline by a clear margin, and rehearsal keeps the
known concepts. Margins leave room for a CPU's rounding, not for a broken method."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METRICS = json.loads((REPO / "reports/metrics.json").read_text())
CHANCE = 1 / 11  # a test render is classified among the demo's 11 concepts


def test_the_clip_baseline_is_near_chance_on_novel_concepts_and_their_descriptions_far_above():
    baseline = METRICS["test"]["classification"]["baseline"]
    assert baseline["target"] <= CHANCE + 0.1
    assert baseline["description_target"] >= 0.8  # the description is what inversion starts from
    assert baseline["retention"] >= 0.9  # the known concepts are known


@pytest.mark.parametrize("recipe", ["paper", "full"])
def test_each_clip_recipe_learns_the_novel_concepts(recipe):
    headline = METRICS["headline"][recipe]
    assert headline["target"] >= headline["baseline_target"] + 0.5


def test_rehearsal_keeps_the_known_concepts():
    full, paper = METRICS["headline"]["full"], METRICS["headline"]["paper"]
    assert full["retention"] >= 0.95 and full["retention"] > paper["retention"]


def test_the_captioner_learns_the_novel_concepts():
    coca = METRICS["families"]["coca"]["headline"]["full"]
    assert coca["baseline_target"] <= CHANCE + 0.1 and coca["target"] >= coca["baseline_target"] + 0.15


# --- the README quotes reports/experiments.md ---------------------------------------------------

import re  # noqa: E402

PERCENT = re.compile(r"(\d+(?:\.\d)?)%")


def seed_means(text: str) -> dict[str, str]:
    """Row name -> its `mean` cell in the seed table of reports/experiments.md."""
    header = next(line for line in text.splitlines() if line.startswith("|") and "| mean" in line)
    column = [c.strip() for c in header.strip("|").split("|")].index("mean")
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| test.") and len(cells) > column:
            rows[cells[0]] = cells[column]
    return rows


def result_section(readme: str) -> str:
    return readme.split("## The result", 1)[1].split("\n## ", 1)[0]


def test_the_readme_quotes_the_mean_over_seeds_of_reports_experiments_md():
    """Every percentage README's "The result" gives is a mean of the seed table (or chance), and
    the five it must give (baseline and each recipe's target, each recipe's retention) are there."""
    means = seed_means((REPO / "reports/experiments.md").read_text())
    quoted = PERCENT.findall(result_section((REPO / "README.md").read_text()))
    allowed = {m.rstrip("%") for m in means.values()} | {f"{100 * CHANCE:.1f}"}
    assert quoted and set(quoted) <= allowed, f"README quotes {sorted(set(quoted) - allowed)}, not in experiments.md"
    needed = ["baseline.target", "paper.target", "paper.retention", "full.target", "full.retention"]
    for key in needed:
        assert means[f"test.classification.{key}"].rstrip("%") in quoted, key


def test_the_checker_catches_a_figure_that_experiments_md_does_not_hold():
    means = seed_means("| | 0 | mean | std |\n|---|---|---|---|\n| test.classification.full.target | 70.0% | 71.0% | 1.0% |\n")
    assert means == {"test.classification.full.target": "71.0%"}
    quoted = PERCENT.findall(result_section("## The result\nrises to 72.0% (chance 9.1%)\n## Next\n50.0%"))
    assert quoted == ["72.0", "9.1"] and not set(quoted) <= {"71.0", "9.1"}
