"""The report's opening figures take their numbers from the evaluations: the transfer arrows from
the headline, chance from the number of classes, the per-concept bars from each model's per-class
accuracy; one lr-curve file per recipe whatever its name."""
from __future__ import annotations

import dataclasses

import pytest

from ktpipe.concepts import ConceptText
from ktpipe.params import Params, build_section
from ktpipe.report import chance_level, concept_bars, lr_points, transfer_points

CLASSES = ["blicket", "dax", "lantern", "clover"]


def evaluation(values: dict[str, float], description: dict[str, float] | None = None) -> dict:
    """An evaluation JSON of one classification set `test` with per-class accuracy `values`."""
    metrics = {f"name_class_{c}_acc": v for c, v in values.items()}
    metrics.update({f"description_class_{c}_acc": v for c, v in (description or {}).items()})
    summary = {"target": (values["blicket"] + values["dax"]) / 2, "retention": (values["lantern"] + values["clover"]) / 2}
    return {"tasks": {"test": "classification"}, "metrics": {"test": {"classification": metrics}},
            "summary": {"test": {"classification": summary}}, "unevaluated": []}


@pytest.fixture
def setup():
    params = build_section(Params, {"lr": 1e-3, "recipes": {"paper": {}, "my recipe": {"lr_multiplier": 2.0}},
                                    "concepts": {"names": CLASSES},
                                    "evaluate": {"use": ["test"], "sets": {"test": {"format": "demo", "split": "test"}}},
                                    "report": {"target_set": "test", "retention_set": "test"}})
    results = {"baseline": evaluation({"blicket": 0.0, "dax": 0.25, "lantern": 1.0, "clover": 0.75},
                                      {"blicket": 0.5, "dax": 1.0}),
               "paper": evaluation({"blicket": 1.0, "dax": 0.5, "lantern": 0.25, "clover": 0.5}),
               "my recipe": evaluation({"blicket": 0.75, "dax": 0.75, "lantern": 1.0, "clover": 1.0})}
    concepts = [ConceptText(c, f"a {c}", role="novel" if c in ("blicket", "dax") else "known") for c in CLASSES]
    return params, results, concepts


def test_chance_is_one_over_the_classes_and_none_without_a_classification(setup):
    params, results, _ = setup
    assert chance_level(results, "test") == pytest.approx(1 / 4)
    assert chance_level(results, "val") is None


def test_transfer_points_come_from_the_headline(setup):
    from ktpipe.report import headline

    params, results, _ = setup
    heads = headline(params, results)
    family = dataclasses.replace(params, recipes={"paper": {}})
    points = transfer_points(params, results, heads, {"vilt": (family, results, {"paper": heads["paper"]})})
    assert [p.label for p in points] == ["model/paper", "model/my recipe", "vilt/paper"]
    paper = points[0]
    assert (paper.target_before, paper.target_after) == (pytest.approx(0.125), pytest.approx(0.75))
    assert (paper.retention_before, paper.retention_after) == (pytest.approx(0.875), pytest.approx(0.375))
    assert paper.chance == pytest.approx(0.25)


def test_concept_bars_are_each_models_per_class_accuracy_novel_concepts_only(setup):
    params, results, concepts = setup
    family = dataclasses.replace(params, recipes={"paper": {}})
    bars = concept_bars(params, results, concepts, {"vilt": (family, {"baseline": results["baseline"],
                                                                      "paper": results["my recipe"]}, {})})
    assert list(bars) == ["blicket", "dax"]
    assert bars["dax"] == {"before (name prompt)": 0.25, "before (description prompt)": 1.0, "paper": 0.5,
                           "my recipe": 0.75, "vilt/paper": 0.75}


def test_lr_points_one_file_per_recipe_at_its_own_lr(setup):
    params, results, _ = setup
    summary = {"test": {"classification": {m: r["summary"]["test"]["classification"] for m, r in results.items()}}}
    points = lr_points(summary, params)
    assert set(points) == {"paper", "my recipe"}
    assert points["my recipe"] == [{"lr": pytest.approx(2e-3), "set": "test", "target": 0.75, "retention": 1.0}]


def test_a_headline_from_a_set_without_target_or_retention_is_blank_with_a_warning(capsys):
    """report.target_set names a retrieval set (its task changed after the params were written):
    the headline's target and retention are None, and the report says why instead of printing blanks."""
    from ktpipe.report import headline

    params = build_section(Params, {"recipes": {"paper": {}}, "concepts": {"names": CLASSES},
                                    "evaluate": {"sets": {"test": {"task": "retrieval", "format": "demo", "split": "test"}}},
                                    "report": {"target_set": "test", "retention_set": "test"}})
    scored = {"tasks": {"test": "retrieval"}, "summary": {"test": {"retrieval": {"t2i_r1": 0.5}}}}
    heads = headline(params, {"baseline": scored, "paper": scored})
    assert heads["paper"]["target"] is None and heads["paper"]["retention"] is None
    err = capsys.readouterr().err
    assert "ktpipe: warning: the headline's target is blank: set 'test' (retrieval) has no target group" in err
    assert "the headline's retention is blank" in err

    classified = evaluation({"blicket": 1.0, "dax": 0.5, "lantern": 1.0, "clover": 0.0})
    params = dataclasses.replace(params, evaluate=build_section(Params, {
        "evaluate": {"sets": {"test": {"format": "demo", "split": "test"}}}}).evaluate)
    assert headline(params, {"baseline": classified, "paper": classified})["paper"]["target"] == 0.75
    assert "warning" not in capsys.readouterr().err
