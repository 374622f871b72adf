"""Outputs that do not lie: over-long descriptions, concepts no set evaluates, the demo world
drawn from the concepts file. In-process on the tiny random-init CLIP (context 24 tokens); the
concepts stage command runs through the `ktpipe` click group (conftest `run_stage_here`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_project, read_params, run_stage_here, write_params
from ktpipe.concepts import load_concepts_file
from ktpipe.datasets import run_data
from ktpipe.describe import run_concepts
from ktpipe.eval import run_evaluate
from ktpipe.transfer.finetune import run_finetune
from ktpipe.transfer.invert import run_invert
from ktpipe.models import load_base_text_budget
from ktpipe.params import ConceptsParams, load_params
from ktpipe.report import run_report

LONG = ("a striped orange ring with a thin golden rim and seven small dents along its upper edge and a "
        "soft shadow underneath and a faint glow around it")


def concepts_file(folder: Path, extra: str) -> Path:
    path = folder / "captions" / "demo.yaml"
    path.write_text(path.read_text() + extra)
    return path


def test_budget_counts_tokens_against_the_context(tiny_project):
    budget = load_base_text_budget(load_params(tiny_project / "params.yaml").model)
    assert budget.context_length == 24
    assert budget.count("a striped orange ring") == 6  # start + 4 words + end
    assert budget.count(LONG) > 24
    kept = budget.kept(LONG)
    assert LONG.startswith(kept) and budget.count(kept) == 24


def test_concepts_stage_rejects_a_description_over_the_context(tiny_project):
    concepts_file(tiny_project, f"  zorp: {{description: {LONG}, role: novel}}\n")
    write_params(tiny_project, concepts={"names": ["blicket", "zorp"]})
    params = load_params(tiny_project / "params.yaml")
    result = run_stage_here(tiny_project, "captions", "captions/demo.yaml", "captions/generated.yaml", "data/concepts",
                            "data/world.json", "data/known.json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    count = load_base_text_budget(params.model).count(LONG)
    assert "concept 'zorp'" in result.stderr and f"{count} tokens" in result.stderr and "context of 24" in result.stderr
    assert "concepts.truncate" in result.stderr
    assert not (tiny_project / "data").exists()


def test_truncate_warns_and_records_the_text_used(tiny_project, capsys):
    path = concepts_file(tiny_project, f"  zorp: {{description: {LONG}, role: novel}}\n")
    budget = load_base_text_budget(load_params(tiny_project / "params.yaml").model)
    concepts = run_concepts(path, tiny_project / "captions/generated.yaml",
                            ConceptsParams(names=("blicket", "zorp"), truncate=True), tiny_project / "data/concepts",
                            budget=budget)
    assert "ktpipe: warning: concept 'zorp'" in capsys.readouterr().err
    zorp = json.loads((tiny_project / "data/concepts/zorp.json").read_text())
    assert zorp["description"] == LONG  # the description as written, and what the tower reads of it
    assert zorp["truncated"]["description"] == budget.kept(LONG)
    assert set(zorp["truncated"]) == {"description", "caption"}
    assert concepts[0].truncated is None  # blicket fits


def test_world_concepts_come_from_the_concepts_file(tiny_project):
    extra = "  zorp: {description: a striped red crescent, role: novel, render: {shape: crescent, color: red, fill: striped}}\n"
    path = concepts_file(tiny_project, extra)
    run_concepts(path, tiny_project / "captions/generated.yaml", ConceptsParams(names=("blicket", "zorp")),
                 tiny_project / "data/concepts", world_path=tiny_project / "data/world.json")
    params = load_params(tiny_project / "params.yaml")
    summary = run_data(params, tiny_project / "data/eval", tiny_project / "data/world.json")
    assert "zorp" in summary["test"]["classes"] and summary["test"]["per_class"]["zorp"] == 2
    assert len(summary["test"]["classes"]) == len(load_concepts_file(path))


@pytest.fixture
def unevaluated_project(tmp_path, tiny_checkpoint):
    """blicket and lantern are drawn by the world; zorp has a description but no render entry."""
    project = make_project(tmp_path / "project", tiny_checkpoint, concepts={"names": ["blicket", "zorp", "lantern"]},
                           invert={"steps": 1, "samples": 2})
    params = read_params(project)
    params["recipes"] = {"paper": {"rehearsal": False}}
    (project / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    concepts_file(project, "  zorp: {description: a solid red crescent, role: novel}\n")
    return project


def test_a_concept_no_set_holds_is_warned_about_and_reported(unevaluated_project, capsys):
    project = unevaluated_project
    params = load_params(project / "params.yaml")
    run_concepts(project / "captions/demo.yaml", project / "captions/generated.yaml", params.concepts,
                 project / "data/concepts", world_path=project / "data/world.json")
    run_data(params, project / "data/eval", project / "data/world.json")
    for name in params.concepts.names:
        run_invert(params, project / f"data/concepts/{name}.json", project / f"data/inverted/{name}")
    run_finetune(params, "paper", project / "data/concepts", project / "data/inverted",
                 project / "models/paper", project / "metrics/finetune/paper.json")
    capsys.readouterr()
    for model in ("baseline", "paper"):
        result = run_evaluate(params, model, project / "models" / model, project / "data/eval",
                              project / "data/concepts", project / f"metrics/eval/{model}.json")
        for set_name in params.evaluate.sets:
            metrics = result["metrics"][set_name]["classification"]
            assert "name_class_blicket_acc" in metrics and not any("zorp" in k for k in metrics)
            assert "zorp" not in result["summary"][set_name]["classification"]
        assert result["unevaluated"] == ["zorp"]
        err = capsys.readouterr().err
        assert "ktpipe: warning: concept 'zorp' is in no evaluation set" in err
        assert "blicket" not in err and "lantern" not in err
    run_report(params, project / "metrics/eval", project / "data/concepts", project / "data/inverted",
               project / "reports")
    markdown = (project / "reports/results.md").read_text()
    assert "| zorp |" not in markdown  # no row in any set's table: it has no accuracy there
    assert "**Not evaluated**: `zorp`" in markdown
    assert "| blicket | target | " in markdown and "| blicket | target | -" not in markdown
