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
