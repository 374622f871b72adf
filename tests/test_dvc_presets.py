"""Every paper preset, applied as the README says, parses under the real `dvc.yaml`: `dvc stage list`
names exactly the stages docs/presets.md says a preset runs (concepts, data,
base_model, invert (every concept in one stage), finetune@ and evaluate@ per recipe, evaluate_baseline,
report, and the three *_family stages per model family it declares), and `dvc status` answers.
No stage runs. `ktpipe preset NAME` applies one and refuses to overwrite uncommitted edits."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from ruamel.yaml import YAML

from conftest import REPO
from stages.cli import main as cli

PRESETS = sorted(p.stem for p in (REPO / "presets").glob("*.yaml"))
FAMILY_STAGES = ("base_model_family", "finetune_family", "evaluate_family")


def expected_stages(params: dict) -> set[str]:
    """The stages README says a params file runs."""
    recipes, families = params["recipes"], params.get("families") or {}
    return {"captions", "data", "base_model", "invert", "evaluate_baseline", "report",
            *(f"{stage}@{r}" for r in recipes for stage in ("finetune", "evaluate")),
            *(f"{stage}@{f}" for f in families for stage in FAMILY_STAGES)}


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"DVC_NO_ANALYTICS": "1", "PATH": str(Path(sys.executable).parent), "HOME": str(root)})


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """dvc.yaml in a DVC project without git, as a fresh clone has it."""
    root = tmp_path_factory.mktemp("presets")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    assert dvc(root, "init", "--no-scm", "-q").returncode == 0
    return root


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parses_under_dvc_with_exactly_its_stages(scratch, tmp_path, name):
    root = tmp_path / "project"
    shutil.copytree(scratch, root)
    result = CliRunner().invoke(cli, ["preset", name, "--params", str(root / "params.yaml"),
                                      "--presets-dir", str(REPO / "presets")])
    assert result.exit_code == 0, result.output
    listed = dvc(root, "stage", "list", "--name-only")
    assert listed.returncode == 0, listed.stderr
    params = YAML(typ="safe", pure=True).load((root / "params.yaml").read_text())
    assert set(listed.stdout.split()) == expected_stages(params)
    assert not {s for s in listed.stdout.split() if "family" in s}  # no demo family rides along
    status = dvc(root, "status", "--json")
    assert status.returncode == 0, status.stderr


def test_the_demo_params_run_the_demo_families(scratch, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(scratch, root)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    listed = dvc(root, "stage", "list", "--name-only")
    params = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())
    assert set(listed.stdout.split()) == expected_stages(params)
    assert {"base_model_family@vilt", "evaluate_family@coca"} <= set(listed.stdout.split())


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", *args], cwd=root, check=True,
                   capture_output=True)


def test_preset_command_refuses_to_overwrite_uncommitted_edits(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(REPO / "presets", root / "presets")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "demo")
    args = ["preset", "table1_vit_b32", "--params", str(root / "params.yaml"), "--presets-dir", str(root / "presets")]
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("seed: 0", "seed: 1"))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "uncommitted edits" in result.output and "--force" in result.output
    assert "seed: 1" in (root / "params.yaml").read_text()  # left as it was
    result = CliRunner().invoke(cli, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert (root / "params.yaml").read_text() == (REPO / "presets/table1_vit_b32.yaml").read_text()
    git(root, "commit", "-q", "-am", "preset")  # committed: the next preset applies without --force
    result = CliRunner().invoke(cli, [*args[:1], "table2_biomedclip", *args[2:]])
    assert result.exit_code == 0 and "table2_biomedclip" in result.output


def test_preset_command_lists_presets_and_names_an_unknown_one(tmp_path):
    result = CliRunner().invoke(cli, ["preset", "--presets-dir", str(REPO / "presets")])
    assert result.exit_code == 0 and result.output.split() == PRESETS
    result = CliRunner().invoke(cli, ["preset", "table99", "--params", str(tmp_path / "params.yaml"),
                                      "--presets-dir", str(REPO / "presets")])
    assert result.exit_code == 2 and "unknown preset 'table99'; presets: fig4_towers" in result.output
    assert not (tmp_path / "params.yaml").exists()
