"""Smoke test of every stage command, run as `dvc repro` runs it, on a tiny random-init CLIP.

The pipeline runs once per module (fixture `pipeline`); each test checks one stage's outputs.
The concepts stage runs as a subprocess (`python -m ktpipe concepts ...`, as dvc.yaml runs it);
every other stage command runs in-process through the `ktpipe` click group (conftest
`run_stage_here`: the same code path and result minus the 5-8 s interpreter start-up that each
subprocess pays), evaluate@full through click's CliRunner, and the 9 inversions no test looks at
directly through the same library call. tests/test_dvc_e2e.py runs every stage command as a
subprocess under `dvc repro`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import open_clip
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from conftest import DEMO_CONCEPTS, NOVEL, make_project, run_stage, run_stage_here, write_params
from stages.cli import main as cli
from ktpipe.transfer.finetune import run_finetune
from ktpipe.models.openclip import CONFIG_FILE, WEIGHTS_FILE
from ktpipe.params import load_params

STAGE_INVERTED = ["blicket", "lantern"]  # one novel, one known concept checked
SAMPLES, SIZE = 2, 16


def check(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_checkpoint) -> dict:
    """Run concepts -> data -> invert -> finetune -> evaluate -> report in one tiny project."""
    project = make_project(tmp_path_factory.mktemp("pipeline") / "project", tiny_checkpoint)
    runs = {}
    runs["captions"] = run_stage(project, "captions", "captions/demo.yaml", "captions/generated.yaml", "data/concepts",
                                 "data/world.json", "data/known.json")
    check(runs["captions"])
    runs["data"] = run_stage_here(project, "data", "data/world.json", "data/eval")
    check(runs["data"])
    runs["invert"] = run_stage_here(project, "invert", "data/concepts", "data/inverted", "--timing", "metrics/invert.json")
    check(runs["invert"])
    for recipe in ("paper", "full"):
        runs[f"finetune@{recipe}"] = run_stage_here(
            project, "finetune", recipe, "data/concepts", "data/inverted",
            f"models/{recipe}", f"metrics/finetune/{recipe}.json",
        )
        check(runs[f"finetune@{recipe}"])
    runs["evaluate@baseline"] = run_stage_here(
        project, "evaluate", "baseline", "models/baseline", "data/eval", "data/concepts", "metrics/eval/baseline.json")
    check(runs["evaluate@baseline"])
    runs["evaluate@paper"] = run_stage_here(
        project, "evaluate", "paper", "models/paper", "data/eval", "data/concepts", "metrics/eval/paper.json",
    )
    check(runs["evaluate@paper"])
    # evaluate@full through click's CliRunner from another working directory (absolute paths)
    runs["cli_evaluate@full"] = CliRunner().invoke(cli, [
        "evaluate", "--params", str(project / "params.yaml"), "full", str(project / "models/full"),
        str(project / "data/eval"), str(project / "data/concepts"), str(project / "metrics/eval/full.json"),
    ])
    runs["report"] = run_stage_here(project, "report", "metrics/eval", "data/concepts", "data/inverted", "reports")
    check(runs["report"])
    return {"project": project, "runs": runs, "checkpoint": tiny_checkpoint}


# --- world, concepts, invert ----------------------------------------------------------------


def test_data_renders_demo_sets_and_writes_manifests(pipeline):
    world = pipeline["project"] / "data/eval"
    assert sorted(p.name for p in world.iterdir()) == ["sets.json", "test", "test.parquet", "val", "val.parquet"]
    sets = json.loads((world / "sets.json").read_text())
    assert sets["val"]["n_images"] == sets["test"]["n_images"] == 2 * len(DEMO_CONCEPTS)
    for split in ("val", "test"):
        folders = sorted(p.name for p in (world / split).iterdir())
        assert folders == sorted(DEMO_CONCEPTS)
        for name in folders:
            pngs = sorted((world / split / name).glob("*.png"))
            assert len(pngs) == 2
            with Image.open(pngs[0]) as image:
                assert image.size == (SIZE, SIZE)


def test_concepts_writes_one_json_per_concept(pipeline):
    folder = pipeline["project"] / "data/concepts"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.json" for n in DEMO_CONCEPTS)
    world = json.loads((pipeline["project"] / "data/world.json").read_text())
    assert world["blicket"] == {"shape": "ring", "color": "orange", "fill": "striped", "role": "novel"}
    assert sorted(world) == sorted(DEMO_CONCEPTS)
    blicket = json.loads((folder / "blicket.json").read_text())
    assert blicket["description"] == "a striped orange ring" and blicket["role"] == "novel"
    assert json.loads((folder / "lantern.json").read_text())["role"] == "known"


@pytest.mark.parametrize("name", STAGE_INVERTED)
def test_invert_writes_images_grid_and_summary(pipeline, name):
    folder = pipeline["project"] / "data/inverted" / name
    assert sorted(p.name for p in folder.iterdir()) == ["grid.png", "images.safetensors", "summary.json"]
    pixels = load_file(str(folder / "images.safetensors"))["pixels"]
    assert pixels.shape == (SAMPLES, 3, SIZE, SIZE)
    assert pixels.min() >= 0 and pixels.max() <= 1
    with Image.open(folder / "grid.png") as grid:
        grid.load()
        assert grid.mode == "RGB" and grid.width > SIZE
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["concept"] == name and len(summary["similarity"]) == SAMPLES
    assert "seconds" not in summary  # a cached output holds only what its inputs determine
    assert {"similarity", "reduction", "padding", "interpolation"} <= set(summary)
    timing = json.loads((pipeline["project"] / "metrics/invert.json").read_text())
    assert timing["concepts"][name]["how"] == "computed" and timing["concepts"][name]["seconds"] > 0
    assert sorted(timing["concepts"]) == sorted(DEMO_CONCEPTS)
    assert -1.0 <= summary["mean_similarity"] <= 1.0
    assert f"inverted {len(DEMO_CONCEPTS)} concepts, reused 0" in pipeline["runs"]["invert"].stdout
    assert not list(folder.parent.glob(".*tmp*")), "temporary folders left behind"


# --- finetune -------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["paper", "full"])
def test_finetune_checkpoint_loads_in_plain_open_clip(pipeline, recipe):
    folder = pipeline["project"] / "models" / recipe
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    saved = load_file(str(folder / WEIGHTS_FILE))
    state = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved), "open_clip did not load the saved weights"
    with torch.no_grad():
        emb = model.encode_image(torch.zeros(1, 3, SIZE, SIZE))
    assert emb.shape == (1, 16)


@pytest.mark.parametrize("recipe, n_concepts", [("paper", len(NOVEL)), ("full", len(DEMO_CONCEPTS))])
def test_finetune_log_counts_images_and_steps(pipeline, recipe, n_concepts):
    log = json.loads((pipeline["project"] / "metrics/finetune" / f"{recipe}.json").read_text())
    assert log["recipe"] == recipe and log["lr"] == pytest.approx(1e-4)
    assert log["n_images"] == n_concepts * SAMPLES
    assert len(log["captions"]) == n_concepts
    assert log["captions"][0] == "A blicket is a striped orange ring."
    steps = -(-n_concepts * SAMPLES // 4)  # one epoch of batches of 4
    assert [r["step"] for r in log["log"]] == list(range(steps))
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in log["log"])  # finite, positive


def tower_of(key: str) -> str:
    return "visual" if key.startswith("visual.") else "other" if key.startswith("logit_") else "text"


def changed_by_tower(base: Path, tuned: Path) -> dict[str, set[str]]:
    """tower -> names of state-dict tensors that differ between two checkpoints."""
    a, b = load_file(str(base / WEIGHTS_FILE)), load_file(str(tuned / WEIGHTS_FILE))
    assert set(a) == set(b)
    out = {"visual": set(), "text": set(), "other": set()}
    for key in a:
        if not torch.equal(a[key], b[key]):
            out[tower_of(key)].add(key)
    return out


def test_finetune_stage_default_trains_only_the_visual_tower(pipeline):
    changed = changed_by_tower(pipeline["checkpoint"], pipeline["project"] / "models/paper")
    assert changed["visual"] and not changed["text"] and not changed["other"]


@pytest.mark.parametrize("towers, trained, frozen", [("visual", "visual", "text"), ("text", "text", "visual")])
def test_finetune_towers_freezes_the_other_tower_bit_exactly(pipeline, tmp_path, towers, trained, frozen):
    project = pipeline["project"]
    params = load_params(project / "params.yaml")
    params = dataclasses.replace(params, finetune=dataclasses.replace(params.finetune, towers=towers))
    out = tmp_path / "tuned"
    run_finetune(params, "paper", project / "data/concepts", project / "data/inverted", out, tmp_path / "log.json")
    changed = changed_by_tower(pipeline["checkpoint"], out)
    base = load_file(str(pipeline["checkpoint"] / WEIGHTS_FILE))
    trained_keys = {k for k in base if tower_of(k) == trained}
    assert not changed[frozen], f"{frozen} tower changed: {sorted(changed[frozen])}"
    assert not changed["other"], "logit scale must stay frozen"
    assert changed[trained] == trained_keys, f"unchanged: {sorted(trained_keys - changed[trained])}"


# --- evaluate and report --------------------------------------------------------------------


@pytest.mark.parametrize("model", ["baseline", "paper", "full"])
def test_evaluate_writes_the_shared_schema(pipeline, model):
    record = json.loads((pipeline["project"] / "metrics/eval" / f"{model}.json").read_text())
    assert list(record) == ["model", "checkpoint", "params", "tasks", "metrics", "summary", "unevaluated"]
    assert record["model"] == model and set(record["params"]) == {"evaluate", "model"}
    assert record["tasks"] == {"val": "classification", "test": "classification"}
    assert record["unevaluated"] == []
    for split in ("val", "test"):
        assert list(record["metrics"][split]) == ["classification"]
        metrics = record["metrics"][split]["classification"]
        assert metrics["n_images"] == 2 * len(DEMO_CONCEPTS)
        for key in ("name_target_acc", "name_retention_acc", "description_target_acc", "name_class_blicket_acc"):
            assert 0.0 <= metrics[key] <= 1.0
        summary = record["summary"][split]["classification"]
        assert summary["target"] == metrics["name_target_acc"]
        assert summary["retention"] == metrics["name_retention_acc"]
        assert summary["description_target"] == metrics["description_target_acc"]
        assert {name: summary[name] for name in NOVEL} == {n: metrics[f"name_class_{n}_acc"] for n in NOVEL}
    # with 2 images per class every accuracy is a multiple of 1/2 per class
    assert record["metrics"]["test"]["classification"]["name_class_blicket_acc"] in (0.0, 0.5, 1.0)


def test_evaluate_records_the_checkpoint(pipeline):
    project = pipeline["project"]
    paper = json.loads((project / "metrics/eval/paper.json").read_text())
    assert paper["checkpoint"] == "models/paper"
    assert json.loads((project / "metrics/eval/baseline.json").read_text())["checkpoint"] is None  # params `model`
    assert "paper on test (classification): target" in pipeline["runs"]["evaluate@paper"].stdout


def test_cli_evaluate_matches_the_stage_schema(pipeline):
    result = pipeline["runs"]["cli_evaluate@full"]
    assert result.exit_code == 0, result.output
    assert "full on test (classification): target" in result.output
    record = json.loads((pipeline["project"] / "metrics/eval/full.json").read_text())
    assert record["model"] == "full" and record["checkpoint"] == str(pipeline["project"] / "models/full")


def test_report_writes_table_metrics_plot_data_and_figure(pipeline):
    reports = pipeline["project"] / "reports"
    assert sorted(p.name for p in reports.iterdir()) == ["figures", "inverted.png", "lr_curve", "metrics.json", "results.md",
                                                        "tradeoff.csv"]
    markdown = (reports / "results.md").read_text()
    for name in NOVEL:
        # one row per set (test and val) for each novel concept
        assert markdown.count(f"| {name} | target |") == 2, name
    assert markdown.count("| lantern | retention |") == 2
    assert "## Headline (target on `test`, retention on `test`)" in markdown
    metrics = json.loads((reports / "metrics.json").read_text())
    assert set(metrics) == {"lr", "headline", "val", "test"}
    assert set(metrics["test"]) == {"classification"}
    assert set(metrics["test"]["classification"]) == {"baseline", "paper", "full"}
    assert 0.0 <= metrics["test"]["classification"]["full"]["target"] <= 1.0
    assert metrics["lr"] == pytest.approx(1e-4)
    evaluated = json.loads((pipeline["project"] / "metrics/eval/full.json").read_text())["metrics"]
    evaluated = evaluated["test"]["classification"]
    assert metrics["test"]["classification"]["full"]["target"] == evaluated["name_target_acc"]
    assert metrics["headline"]["full"]["target"] == evaluated["name_target_acc"]
    assert metrics["headline"]["full"]["retention"] == evaluated["name_retention_acc"]
    assert sorted(p.name for p in (reports / "lr_curve").iterdir()) == ["full.json", "paper.json"]
    # the trade-off's points (a DVC plot): each recipe at its headline numbers; no WiSE-FT alphas here
    tradeoff = pd.read_csv(reports / "tradeoff.csv").set_index("recipe")
    for recipe in ("paper", "full"):
        assert tradeoff.loc[recipe, "target"] == pytest.approx(metrics["headline"][recipe]["target"])
        assert tradeoff.loc[recipe, "retention"] == pytest.approx(metrics["headline"][recipe]["retention"])
    assert tradeoff["setting"].isna().all() and "figures/tradeoff.png" not in markdown
    for recipe in ("paper", "full"):
        curve = json.loads((reports / "lr_curve" / f"{recipe}.json").read_text())
        val = metrics["val"]["classification"][recipe]
        assert curve == [{"lr": pytest.approx(1e-4), "set": "val", "target": val["target"], "retention": val["retention"]}]
    # the report opens with the transfer figure, then the per-concept bars, then the tables
    assert markdown.startswith("# Knowledge Transfer results\n\n![Target against retention")
    assert markdown.index("figures/target_retention.png") < markdown.index("figures/concepts.png") < markdown.index("| Class |")
    for name in ("target_retention.png", "concepts.png"):
        with Image.open(reports / "figures" / name) as figure:
            assert figure.width > 300 and figure.height > 200
    with Image.open(reports / "inverted.png") as figure:
        figure.load()
        assert figure.width > 100 and figure.height > 100


# --- base model -----------------------------------------------------------------------------


def test_base_model_stage_records_a_real_backend_model(tiny_project, tiny_checkpoint):
    check(run_stage_here(tiny_project, "base_model", "data/world.json", "models/baseline", "metrics/base_model.json"))
    record = json.loads((tiny_project / "models/baseline/model.json").read_text())
    assert record["backend"] == "open_clip" and record["name"] == f"local-dir:{tiny_checkpoint}"
    assert record["image_size"] == SIZE and record["kind"] == "dual_encoder"
    assert record["n_parameters"] == sum(v.numel() for v in load_file(str(tiny_checkpoint / WEIGHTS_FILE)).values())
    log = json.loads((tiny_project / "metrics/base_model.json").read_text())
    assert log.pop("seconds") >= 0 and log == record  # the wall time stays out of the cached record


def test_base_model_stage_pretrains_the_demo_model(tmp_path, tiny_checkpoint):
    project = make_project(tmp_path / "project", tiny_checkpoint)
    out = tmp_path / "pretrained"
    write_params(
        project,
        model={"backend": "demo", "name": "ktpipe-demo", "pretrained": str(out)},
        pretrain={"steps": 2, "batch_size": 16, "name_batch": 8},
        world={"image_size": 32},
    )
    check(run_stage_here(project, "captions", "captions/demo.yaml", "captions/generated.yaml", "data/concepts",
                         "data/world.json", "data/known.json"))
    check(run_stage_here(project, "base_model", "data/known.json", out, "metrics/pretrain.json"))
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    log = json.loads((project / "metrics/pretrain.json").read_text())
    assert [r["step"] for r in log["log"]] == [0, 1]
    assert set(log["final"]) == {"step", "loss", "image_loss", "name_loss"}
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert model.visual.image_size == (32, 32)
    # the demo backend loads what pretrain wrote
    from ktpipe.models import load_base_model

    loaded = load_base_model(load_params(project / "params.yaml").model)
    assert loaded.image_size == 32


# --- command line ---------------------------------------------------------------------------

COMMANDS = ["data", "base_model", "captions", "invert", "finetune", "evaluate", "report"]


def test_cli_lists_every_command():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_cli_command_help(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: main {command}" in result.output and "--params" in result.output


def concepts_command(project: Path, out: Path) -> list[str]:
    """`ktpipe concepts` on the project's files with absolute paths (CliRunner keeps the cwd)."""
    return ["captions", "--params", str(project / "params.yaml"), str(project / "captions/demo.yaml"),
            str(project / "captions/generated.yaml"), str(out), str(project / "world.json"), str(project / "known.json")]


def test_cli_concepts_writes_concept_files(tiny_project):
    out = tiny_project / "out"
    result = CliRunner().invoke(cli, concepts_command(tiny_project, out))
    assert result.exit_code == 0, result.output
    assert f"wrote {len(DEMO_CONCEPTS)} concept captions to {out}" in result.output
    assert sorted(p.stem for p in out.iterdir()) == sorted(DEMO_CONCEPTS)
    assert json.loads((out / "dax.json").read_text())["description"] == "an outlined pink triangle"


def test_cli_user_error_exits_2_with_one_line(tiny_project):
    write_params(tiny_project, concepts={"names": ["blicket", "moongate"]})
    out = tiny_project / "out"
    result = CliRunner().invoke(cli, concepts_command(tiny_project, out))
    assert result.exit_code == 2
    assert "moongate" in result.output and "Traceback" not in result.output
    assert result.output.startswith("ktpipe: error: ") and result.output.count("\n") == 1
    assert not out.exists()


def test_cli_finetune_rejects_non_positive_lr(tiny_project):
    result = CliRunner().invoke(cli, [
        "finetune", "--params", str(tiny_project / "params.yaml"), "--lr", "0", "paper",
        str(tiny_project / "concepts"), str(tiny_project / "inverted"), str(tiny_project / "out"),
        str(tiny_project / "log.json"),
    ])
    assert result.exit_code == 2 and "--lr must be a finite positive number" in result.output
    assert not (tiny_project / "out").exists() and not (tiny_project / "log.json").exists()
