"""Outputs that do not lie: over-long descriptions, concepts no set evaluates, the demo world
drawn from the captions file. In-process on the tiny random-init CLIP (context 24 tokens); the
captions stage script runs through its own `__main__` (conftest `run_stage_here`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_project, read_params, run_stage_here, write_params
from ktpipe.captions import CaptionsError, load_captions, run_captions
from ktpipe.eval import run_evaluate
from ktpipe.evalsets import run_data
from ktpipe.finetune import run_finetune
from ktpipe.invert import run_invert
from ktpipe.models import load_base_text_budget
from ktpipe.params import load_params
from ktpipe.report import run_report

LONG = ("a striped orange ring with a thin golden rim and seven small dents along its upper edge and a "
        "soft shadow underneath and a faint glow around it")


def captions_file(folder: Path, extra: str) -> Path:
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


def test_captions_stage_rejects_a_description_over_the_context(tiny_project):
    captions_file(tiny_project, f"  zorp: {{description: {LONG}, role: novel}}\n")
    write_params(tiny_project, concepts=["blicket", "zorp"])
    params = load_params(tiny_project / "params.yaml")
    result = run_stage_here(tiny_project, "captions", "captions/demo.yaml", "captions/generated.yaml", "data/captions",
                            "data/world.json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    count = load_base_text_budget(params.model).count(LONG)
    assert "concept 'zorp'" in result.stderr and f"{count} tokens" in result.stderr and "context of 24" in result.stderr
    assert "captions.truncate" in result.stderr
    assert not (tiny_project / "data").exists()


def test_truncate_warns_and_records_the_text_used(tiny_project, capsys):
    path = captions_file(tiny_project, f"  zorp: {{description: {LONG}, role: novel}}\n")
    budget = load_base_text_budget(load_params(tiny_project / "params.yaml").model)
    concepts = run_captions(path, tiny_project / "captions/generated.yaml", ("blicket", "zorp"),
                            tiny_project / "data/captions", budget=budget, truncate=True)
    assert "ktpipe: warning: concept 'zorp'" in capsys.readouterr().err
    zorp = json.loads((tiny_project / "data/captions/zorp.json").read_text())
    assert zorp["description"] == LONG  # the description as written, and what the tower reads of it
    assert zorp["truncated"]["description"] == budget.kept(LONG)
    assert set(zorp["truncated"]) == {"description", "caption"}
    assert concepts[0].truncated is None  # blicket fits


def test_world_concepts_come_from_the_captions_file(tiny_project):
    extra = "  zorp: {description: a solid red crescent, role: novel, render: {shape: crescent, color: red, fill: solid}}\n"
    path = captions_file(tiny_project, extra)
    run_captions(path, tiny_project / "captions/generated.yaml", ("blicket", "zorp"), tiny_project / "data/captions",
                 world_path=tiny_project / "data/world.json")
    params = load_params(tiny_project / "params.yaml")
    summary = run_data(params, tiny_project / "data/eval", tiny_project / "data/world.json")
    assert "zorp" in summary["test"]["classes"] and summary["test"]["per_class"]["zorp"] == 2
    assert len(summary["test"]["classes"]) == len(load_captions(path))


@pytest.fixture
def unevaluated_project(tmp_path, tiny_checkpoint):
    """blicket and lantern are drawn by the world; zorp has a description but no render entry."""
    project = make_project(tmp_path / "project", tiny_checkpoint, concepts=["blicket", "zorp", "lantern"],
                           invert={"steps": 1, "samples": 2})
    params = read_params(project)
    params["recipes"] = {"paper": {"rehearsal": False}}
    (project / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    captions_file(project, "  zorp: {description: a solid red crescent, role: novel}\n")
    return project


def test_a_concept_no_set_holds_is_warned_about_and_reported(unevaluated_project, capsys):
    project = unevaluated_project
    params = load_params(project / "params.yaml")
    run_captions(project / "captions/demo.yaml", project / "captions/generated.yaml", params.concepts,
                 project / "data/captions", world_path=project / "data/world.json")
    run_data(params, project / "data/eval", project / "data/world.json")
    for name in params.concepts:
        run_invert(params, project / f"data/captions/{name}.json", project / f"data/inverted/{name}")
    run_finetune(params, "paper", project / "data/captions", project / "data/inverted",
                 project / "models/finetuned/paper", project / "metrics/finetune/paper.json")
    capsys.readouterr()
    for tag, checkpoint in (("baseline", None), ("paper", project / "models/finetuned/paper")):
        metrics = run_evaluate(params, tag, checkpoint, project / "data/eval", project / "data/captions",
                               project / f"metrics/eval/{tag}.json")
        assert "test_name_class_blicket_acc" in metrics and not any("zorp" in k for k in metrics)
        err = capsys.readouterr().err
        assert "ktpipe: warning: concept 'zorp' is in no evaluation set" in err
        assert "blicket" not in err and "lantern" not in err
    run_report(params, project / "metrics/eval", project / "data/captions", project / "data/inverted",
               project / "reports")
    markdown = (project / "reports/results.md").read_text()
    assert "| zorp | target | not evaluated |" in markdown
    assert "**Not evaluated**: `zorp`" in markdown
    assert "| blicket | target | " in markdown and "| blicket | target | not evaluated" not in markdown
