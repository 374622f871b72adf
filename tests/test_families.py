"""Model families: params `families.<name>` as a merge patch of the file, the stage commands with
`--family`, and the report that puts the families side by side."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ruamel.yaml import YAML

from conftest import make_project, read_params, run_stage_here
from ktpipe.params import ParamsError, load_params, merge_patch

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
CONCEPTS = ["blicket", "dax", "lantern"]


def test_merge_patch_merges_mappings_deletes_nulls_and_replaces_the_rest():
    target = {"a": {"b": 1, "c": 2}, "d": [1, 2], "e": 3}
    assert merge_patch(target, {"a": {"b": 5, "c": None}, "d": [3], "f": {"g": 1}}) == {
        "a": {"b": 5}, "d": [3], "e": 3, "f": {"g": 1}}
    assert target == {"a": {"b": 1, "c": 2}, "d": [1, 2], "e": 3}  # the target is left as it was


def test_the_demo_vilt_family_overrides_only_what_it_names_and_shares_the_clip_inversions():
    params = load_params(REPO_PARAMS)
    vilt = load_params(REPO_PARAMS, "vilt")
    assert vilt.model.backend == "demo_vilt" and vilt.model.pretrained == "models/vilt/baseline"
    assert vilt.finetune.loss == "itm" and vilt.finetune.epochs == params.finetune.epochs
    assert vilt.finetune.temperature is None  # null restores the default: the model's own
    assert list(vilt.recipes) == ["paper"] and vilt.models() == ("baseline", "paper")
    assert list(vilt.used_sets()) == ["test_small", "test_pairs"]
    assert vilt.used_sets()["test_small"] == params.evaluate.sets["test_small"] and vilt.report.target_set == "test_small"
    assert vilt.families == {} and set(params.families) == {"vilt", "coca"}
    assert params.model.backend == "demo" and params.recipe("full").rehearsal  # the file's own model is untouched


def test_the_demo_coca_family_captions_and_shares_the_clip_inversions():
    params = load_params(REPO_PARAMS)
    coca = load_params(REPO_PARAMS, "coca")
    assert coca.model.backend == "demo_coca" and coca.pretrain.init_from == "models/baseline"
    assert coca.finetune.loss == "coca" and coca.finetune.decoder and coca.finetune.caption_weight == 0.1
    assert coca.used_sets()["test_captioning"].task == "captioning" and "test_captioning" not in params.used_sets()
    assert set(params.evaluated_sets()) == set(params.evaluate.sets)  # the data stage writes every set once


OWN = ("    lr: 1.0e-3\n    model: {backend: demo_vilt, name: ktpipe-demo-vilt, pretrained: models/other/baseline}\n"
       "    pretrain: null\n")


def write_with_family(tmp_path: Path, family: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(REPO_PARAMS.read_text().split("\nfamilies:")[0] + "\nfamilies:\n  other:\n" + family)
    return path


def test_a_family_has_its_own_recipes(tmp_path):
    family = OWN + "    recipes: {noisy: {images: noise}}\n"
    params = load_params(write_with_family(tmp_path, family))
    other = params.family("other")
    assert other.recipes == {"noisy": {"images": "noise"}} and other.recipe("noisy").images == "noise"
    assert other.models() == ("baseline", "noisy") and set(params.recipes) == {"paper", "full"}


@pytest.mark.parametrize("family, needles", [
    (OWN + "    recipes: {}\n    world: {image_size: 64}\n", ["'families.other.world'", "concepts, inversions and seed"]),
    (OWN + "    recipes: {}\n    invert: {init: normal}\n", ["'families.other.invert'", "inversions"]),
    (OWN + "    recipes: {}\n    finetune: {epochs: 0}\n", ["families.other", "finetune.epochs"]),
    ("    recipes: {}\n", ["'families.other.lr'", "'families.other.model'", "'families.other.pretrain'", "sets its own"]),
    (OWN + "    recipes: {}\n    evaluate: {sets: {val: null}}\n", ["'families.other.evaluate.sets'", "evaluate.use"]),
    (OWN + "    recipes: {}\n    evaluate: {use: [test, nowhere]}\n", ["families.other", "'evaluate.use' names ['nowhere']"]),
    ("    - model\n", ["'families.other' must be a mapping"]),
])
def test_a_bad_family_is_an_error_naming_it(tmp_path, family, needles):
    with pytest.raises(ParamsError) as err:
        load_params(write_with_family(tmp_path, family))
    for needle in needles:
        assert needle in str(err.value)


def test_an_unknown_family_is_a_stage_error(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(REPO_PARAMS.read_text())
    result = run_stage_here(project, "invert", "--family", "vit", "data/concepts/blicket.json", "data/vit/blicket")
    assert result.returncode == 2
    assert "unknown model family 'vit'; params key 'families' defines ['coca', 'vilt']" in result.stderr
    assert not (project / "data").exists()


def check(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.fixture(scope="module")
def families_project(tmp_path_factory, tiny_checkpoint) -> Path:
    """The file's model (the tiny CLIP) and a demo ViLT family through every stage command, as
    dvc.yaml runs them, on three concepts."""
    family = {
        "lr": 1.0e-3,
        "model": {"backend": "demo_vilt", "name": "ktpipe-demo-vilt", "pretrained": "models/vilt/baseline"},
        "pretrain": {"steps": 2, "batch_size": 8, "candidates": 3, "mlm_weight": 0.5, "name_objective": False},
        "finetune": {"loss": "itm", "towers": "both", "swapped_names": True, "temperature": None},
        "recipes": {"paper": {"rehearsal": False}},
        "evaluate": {"templates": "photo", "use": ["test"]},
    }
    project = make_project(
        tmp_path_factory.mktemp("families") / "project", tiny_checkpoint,
        concepts={"names": CONCEPTS, "file": "captions/demo.yaml"}, world={"image_size": 32},
        inverted=["blicket", "dax"], families={"vilt": family})
    params = read_params(project)
    params["recipes"] = {"paper": {"rehearsal": False}}  # one recipe (tiny_params has two)
    YAML(typ="safe", pure=True).dump(params, project / "params.yaml")
    check(run_stage_here(project, "captions", "captions/demo.yaml", "captions/generated.yaml", "data/concepts",
                         "data/world.json", "data/known.json"))
    check(run_stage_here(project, "data", "data/world.json", "data/eval"))
    for name in ("blicket", "dax"):
        check(run_stage_here(project, "invert", f"data/concepts/{name}.json", f"data/inverted/{name}"))
    check(run_stage_here(project, "finetune", "paper", "data/concepts", "data/inverted", "models/paper",
                         "metrics/finetune/paper.json"))
    for model in ("baseline", "paper"):
        check(run_stage_here(project, "evaluate", model, f"models/{model}", "data/eval", "data/concepts",
                             f"metrics/eval/{model}.json"))
    check(run_stage_here(project, "base_model", "--family", "vilt", "data/known.json", "models/vilt/baseline",
                         "metrics/vilt/base_model.json"))
    check(run_stage_here(project, "finetune_family", "--family", "vilt", "data/concepts", "data/inverted", "models/vilt/finetuned",
                         "metrics/vilt/finetune"))
    check(run_stage_here(project, "evaluate_family", "--family", "vilt", "models/vilt/finetuned", "data/eval", "data/concepts",
                         "metrics/eval/families/vilt"))
    check(run_stage_here(project, "report", "metrics/eval", "data/concepts", "data/inverted", "reports",
                         "--families-dir", "metrics/eval/families"))
    return project


def test_family_stages_run_the_family_model(families_project):
    project = families_project
    assert (project / "models/vilt/baseline/config.json").is_file()
    assert (project / "models/vilt/finetuned/paper").is_dir()
    finetuned = json.loads((project / "metrics/vilt/finetune/paper.json").read_text())
    assert finetuned["loss"] == "itm" and finetuned["lr"] == pytest.approx(1e-3)
    # the learned descriptions under every other concept's name are mismatches too
    assert "A dax is a striped orange ring." in finetuned["negatives"]
    assert "A lantern is an outlined pink triangle." in finetuned["negatives"]
    evaluated = json.loads((project / "metrics/eval/families/vilt/paper.json").read_text())
    assert evaluated["params"]["model"]["backend"] == "demo_vilt" and set(evaluated["metrics"]) == {"test"}
    assert evaluated["checkpoint"] == "models/vilt/finetuned/paper"


def test_report_puts_the_families_side_by_side(families_project):
    reports = families_project / "reports"
    markdown = (reports / "results.md").read_text()
    assert "## Model families side by side (params `families`)" in markdown
    assert "| `model` (open_clip) | paper |" in markdown and "| `vilt` (demo_vilt) | paper |" in markdown
    assert "## Family `vilt` (demo_vilt:ktpipe-demo-vilt, models/vilt/baseline)" in markdown
    assert "### `vilt`: set `test` (classification, demo)" in markdown
    metrics = json.loads((reports / "metrics.json").read_text())
    evaluated = json.loads((families_project / "metrics/eval/families/vilt/paper.json").read_text())
    assert metrics["families"]["vilt"]["headline"]["paper"]["target"] == pytest.approx(
        evaluated["summary"]["test"]["classification"]["target"])
    assert "vilt" not in metrics["test"]["classification"]  # the file's own tables hold its own models only


def test_report_refuses_a_malformed_family_option(families_project):
    result = run_stage_here(families_project, "report", "metrics/eval", "data/concepts", "data/inverted", "reports2",
                            "--family-results", "vilt")
    assert result.returncode == 2 and "--family-results takes NAME=EVAL_DIR, got 'vilt'" in result.stderr
    assert not (families_project / "reports2").exists()
