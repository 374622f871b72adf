"""One entry surface: every dvc.yaml stage runs a module of `stages/` (`python -m stages.<stage>`),
each exposing one click command, and the `ktpipe` console script reaches the very same command
objects plus the commands that are not stages (`ktpipe/commands/`). Run by hand, a stage's paths
default to those dvc.yaml passes it."""
from __future__ import annotations

import importlib
import pkgutil
import re
import shutil
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner
from ruamel.yaml import YAML

import stages
from conftest import REPO
from ktpipe import commands
from stages.cli import main

COMMAND = re.compile(r"^python -m stages\.(\w+)\b(.*)$")
STAGE_MODULES = {"captions", "data", "base_model", "invert", "finetune", "evaluate", "finetune_family",
                 "evaluate_family", "report"}


def dvc_stages() -> dict[str, str]:
    """Stage name (foreach stages by their prefix) -> its cmd."""
    raw = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: " ".join(str((stage.get("do") or stage)["cmd"]).split()) for name, stage in raw.items()}


def test_every_stage_runs_a_stages_module_that_the_console_script_also_lists():
    modules = set()
    for name, cmd in dvc_stages().items():
        match = COMMAND.match(cmd)
        assert match, f"stage {name!r} does not run a module of stages/: {cmd!r}"
        modules.add(match.group(1))
    assert modules == STAGE_MODULES
    listed = set(main.list_commands(click.Context(main)))
    assert listed == STAGE_MODULES | {"experiments", "preset", "ship_base_models"}


def test_the_console_script_reaches_the_same_command_objects():
    """One definition per command: `ktpipe invert` is `stages.invert.command` itself."""
    ctx = click.Context(main)
    for module in pkgutil.iter_modules(stages.__path__):
        if module.name in STAGE_MODULES:
            command = importlib.import_module(f"stages.{module.name}").command
            assert main.get_command(ctx, module.name) is command and command.name == module.name
    for module in pkgutil.iter_modules(commands.__path__):
        command = main.get_command(ctx, module.name)
        assert isinstance(command, click.Command) and command.name == module.name
    assert main.get_command(ctx, "cli") is None and main.get_command(ctx, "concepts") is None


def test_help_lists_the_commands_and_an_unknown_one_is_a_usage_error():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "invert" in result.output and "captions" in result.output
    result = runner.invoke(main, ["concepts"])
    assert result.exit_code == 2 and "No such command 'concepts'" in result.output


def test_family_means_one_thing_everywhere():
    """`--family NAME` applies params `families.NAME` wherever it appears (the report's family
    folders are `--family-results`)."""
    ctx = click.Context(main)
    seen = 0
    for name in main.list_commands(ctx):
        for param in main.get_command(ctx, name).params:
            if "--family" in getattr(param, "opts", ()):
                seen += 1
                assert param.name == "family" and "families.NAME" in param.help, name
    assert seen >= 6


# --- paths default to the dvc.yaml layout ---------------------------------------------------------

LIBRARY_CALLS = {  # command -> (module, function) the command calls with its paths
    "data": ("ktpipe.datasets", "run_data"),
    "base_model": ("ktpipe.base_model", "run_base_model"),
    "invert": ("ktpipe.transfer.invert", "run_invert_all"),
    "finetune": ("ktpipe.transfer.finetune", "run_finetune"),
    "evaluate": ("ktpipe.eval", "run_evaluate"),
    "finetune_family": ("ktpipe.transfer.finetune", "run_finetune"),
    "evaluate_family": ("ktpipe.eval", "run_evaluate"),
    "report": ("ktpipe.report", "run_report"),
}


def called_paths(monkeypatch, project, argv: list[str]) -> list[str]:
    """The path arguments the command hands its library function (every call, in order)."""
    command = argv[0]
    module, function = LIBRARY_CALLS[command]
    calls = []

    def record(*args, **kwargs):
        calls.extend(str(a) for a in (*args, *kwargs.values()) if a.__class__.__name__.endswith("Path"))
        return {} if command == "data" else {"seconds": 0, "n_images": 0, "concept": "x", "metrics": {}, "summary": {},
                                                    "concepts": {}}

    monkeypatch.setattr(importlib.import_module(module), function, record)
    monkeypatch.chdir(project)
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    return calls


def dvc_paths(stage: str, key: str | None = None, flags: tuple[str, ...] = ()) -> list[str]:
    """The path arguments of a stage's dvc.yaml cmd (flags and their values dropped)."""
    words = dvc_stages()[stage].replace("${key}", key or "").replace("${item}", key or "").split()[3:]
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word.startswith("--"):
            skip = word not in flags
        elif not word.startswith("$") and word not in (key, "baseline"):
            out.append(word)
    return out


@pytest.fixture
def project(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


@pytest.mark.parametrize("stage,argv", [
    ("data", ["data"]),
    ("base_model", ["base_model"]),
    ("base_model_family", ["base_model", "--family", "vilt"]),
    ("invert", ["invert"]),
    ("finetune", ["finetune", "paper"]),
    ("evaluate_baseline", ["evaluate", "baseline"]),
    ("evaluate", ["evaluate", "full"]),
    ("report", ["report"]),
])
def test_a_stage_run_by_hand_takes_the_paths_dvc_yaml_passes(monkeypatch, project, stage, argv):
    key = {"base_model_family": "vilt", "finetune": "paper", "evaluate": "full"}.get(stage)
    expected = dvc_paths(stage, key, flags=("--timing",))
    got = called_paths(monkeypatch, project, argv)
    assert sorted(got) == sorted(expected)


def test_the_family_stages_default_to_their_dvc_yaml_folders(monkeypatch, project):
    got = called_paths(monkeypatch, project, ["finetune_family", "--family", "vilt"])
    expected = dvc_paths("finetune_family", "vilt")
    assert got[:2] == expected[:2] and got[2] == f"{expected[2]}/paper" and got[3] == f"{expected[3]}/paper.json"
    got = called_paths(monkeypatch, project, ["evaluate_family", "--family", "coca"])
    expected = dvc_paths("evaluate_family", "coca")
    assert got[1:3] == expected[1:3] and got[-1] == f"{expected[3]}/full.json"


def test_captions_defaults_to_the_params_caption_files(monkeypatch, project):
    import ktpipe.describe
    import ktpipe.models

    calls = []
    monkeypatch.setattr(ktpipe.models, "load_base_text_budget", lambda model: None)
    monkeypatch.setattr(ktpipe.describe, "run_concepts", lambda *args: calls.append([str(a) for a in args]) or [])
    monkeypatch.chdir(project)
    assert CliRunner().invoke(main, ["captions"]).exit_code == 0
    dvc = dvc_stages()["captions"].split()[3:]
    assert dvc[:2] == ["${concepts.file}", "${concepts.generated}"]
    assert calls[0][:2] == ["captions/demo.yaml", "captions/generated.yaml"]
    assert [calls[0][3], *calls[0][5:]] == dvc[2:]


# --- the quick exit ---------------------------------------------------------------------------------

# a stage's `python -m stages.<stage>` with an exit handler registered first, as a library the command imports would
ENTRY = ("import atexit, runpy, sys; atexit.register(lambda: print('exit handler ran', flush=True)); "
         "sys.argv = ['ktpipe', *sys.argv[1:]]; runpy.run_module('stages.data', run_name='__main__')")


def run_entry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_the_entry_point_keeps_the_status_the_output_and_the_exit_handlers():
    """A stage skips the interpreter's teardown (ktpipe.cli.run_command), not what an exit does."""
    done = run_entry("--help")
    assert done.returncode == 0 and "Usage" in done.stdout and done.stdout.endswith("exit handler ran\n")
    usage = run_entry("--no-such-option")
    assert usage.returncode == 2 and "No such option" in usage.stderr
    assert "exit handler ran" in usage.stdout


def test_a_profiled_run_exits_the_usual_way_so_the_profile_is_written(tmp_path):
    profile = tmp_path / "ktpipe.prof"
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "stages", "--version"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and "version" in done.stdout
    assert profile.is_file() and profile.stat().st_size > 0
