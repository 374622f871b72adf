"""Pure metric functions and the classification scoring/prompt helpers, checked by hand."""

import pytest
import torch

from ktpipe.concepts import ConceptText
from ktpipe.datasets import build_manifest
from ktpipe.eval.classification import (
    ZeroShotClassification, build_candidates, candidate_classes, description_prompt, metric_key, name_prompts,
    normalize, score,
)
from ktpipe.eval.metrics import accuracy, per_class_accuracy

CONCEPTS = [
    ConceptText("blicket", "a striped orange ring", role="novel"),
    ConceptText("lantern", "a solid orange hexagon", role="known"),
    ConceptText("dax", "an outlined pink triangle", role="novel"),
    ConceptText("clover", "a solid green cross", role="known"),
]


def test_accuracy():
    assert accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])) == pytest.approx(0.75)
    assert accuracy(torch.tensor([3]), torch.tensor([3])) == 1.0


def test_accuracy_of_empty_set_raises():
    with pytest.raises(ValueError, match="empty"):
        accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))


def test_per_class_accuracy_with_absent_class():
    pred, target = torch.tensor([0, 0, 1, 0, 2]), torch.tensor([0, 0, 0, 2, 2])
    assert per_class_accuracy(pred, target, 4) == [pytest.approx(2 / 3), None, 0.5, None]


TEMPLATES = ["a photo of a {}."]
CANDIDATES = build_candidates([c.name for c in CONCEPTS], CONCEPTS, TEMPLATES)


def test_score_groups_and_classes():
    # labels: blicket x2, lantern x2, dax x1; clover has no images.
    labels = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0])
    assert score(pred, labels, CANDIDATES, "name") == {
        "name_overall_acc": pytest.approx(3 / 5),
        "name_target_acc": pytest.approx(1 / 3),  # blicket 1/2 right, dax 0/1
        "name_retention_acc": 1.0,  # lantern 2/2
        "name_class_blicket_acc": 0.5,
        "name_class_lantern_acc": 1.0,
        "name_class_dax_acc": 0.0,
    }


def test_score_without_known_concepts_has_no_retention_key():
    novel = build_candidates(["blicket", "dax"], CONCEPTS, TEMPLATES)
    out = score(torch.tensor([0, 1]), torch.tensor([0, 0]), novel, "description")
    assert out == {"description_overall_acc": 0.5, "description_target_acc": 0.5,
                   "description_class_blicket_acc": 0.5}


def test_name_prompts_with_aliases_and_override():
    templates = ["a photo of a {}.", "a {}."]
    wug = ConceptText("wug", "a solid purple crescent", aliases=("moon",))
    assert name_prompts(wug, templates) == ["a photo of a wug.", "a wug.", "a photo of a moon.", "a moon."]
    fixed = ConceptText("wug", "a solid purple crescent", aliases=("moon",), prompt="a wug moon.")
    assert name_prompts(fixed, templates) == ["a wug moon."]


def test_description_prompt_ends_with_one_period():
    assert description_prompt(CONCEPTS[0].description) == "a striped orange ring."
    assert description_prompt("a red dot.") == "a red dot."


def test_score_without_per_class_keeps_concept_classes_only():
    candidates = build_candidates(["blicket", "goldfish", "tench"], CONCEPTS, TEMPLATES)
    out = score(torch.tensor([0, 2, 2]), torch.tensor([0, 1, 2]), candidates, "name", per_class=False)
    assert out == {"name_overall_acc": pytest.approx(2 / 3), "name_target_acc": 1.0, "name_retention_acc": 0.5,
                   "name_class_blicket_acc": 1.0}


def test_candidates_match_dataset_classes_to_concepts():
    lung = ConceptText("lung_cancer", "a dense and irregular mass", role="novel")
    got = build_candidates(["Lung Cancer", "Pleural Effusion"], [lung], ["a chest x-ray showing {}."])
    assert [(c.key, c.group, c.description) for c in got] == [
        ("lung_cancer", "target", "a dense and irregular mass"), ("pleural_effusion", "retention", None)]
    assert got[0].prompts == ("a chest x-ray showing lung cancer.",)
    assert got[1].prompts == ("a chest x-ray showing Pleural Effusion.",)


def test_normalize_and_metric_key():
    assert normalize(" Pleural_Effusion ") == normalize("pleural-effusion") == "pleural effusion"
    assert metric_key("Pleural Effusion") == "pleural_effusion" and metric_key("hen-of-the-woods") == "hen_of_the_woods"


def test_candidate_classes_append_extra_classes_once():
    manifest = build_manifest("rare", ["moongate", "tonometer"], [("a.png", 0), ("b.png", 1)])
    names, label_map = candidate_classes(manifest, ["tench", "Moongate", "goldfish"])
    assert names == ["moongate", "tonometer", "tench", "goldfish"] and label_map == [0, 1]


def test_classification_summary_picks_groups_and_novel_concepts():
    pred, labels = torch.tensor([0, 1, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 2])  # as test_score_groups_and_classes
    metrics = {"n_images": 5.0, **score(pred, labels, CANDIDATES, "name"), "description_target_acc": 0.25}
    assert ZeroShotClassification().summary(metrics, CONCEPTS) == {
        "target": pytest.approx(1 / 3), "retention": 1.0, "description_target": 0.25, "blicket": 0.5, "dax": 0.0}
