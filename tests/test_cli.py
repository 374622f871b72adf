"""One entry surface: every stage in dvc.yaml is a command of the `ktpipe` group, found by its
module in `ktpipe/commands/`, and each command module exposes one click command."""
from __future__ import annotations

import pkgutil
import re
import subprocess
import sys

import click
from click.testing import CliRunner
from ruamel.yaml import YAML

from conftest import REPO
from ktpipe import commands
from ktpipe.cli import main

COMMAND = re.compile(r"^python -m ktpipe (\w+)\b")


def stage_commands() -> dict[str, str]:
    """Stage name -> the ktpipe command its `cmd` runs."""
    stages = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        cmd = " ".join(str((stage.get("do") or stage)["cmd"]).split())
        match = COMMAND.match(cmd)
        assert match, f"stage {name!r} does not run a ktpipe command: {cmd!r}"
        out[name] = match.group(1)
    return out


def test_every_stage_runs_a_command_of_the_group():
    listed = set(main.list_commands(click.Context(main)))
    assert set(stage_commands().values()) <= listed
    assert {"data", "base_model", "concepts", "invert", "finetune", "evaluate", "report", "experiments",
            "finetune_family", "evaluate_family", "preset", "ship_base_models"} == listed


def test_each_command_module_exposes_a_click_command_named_after_it():
    for module in pkgutil.iter_modules(commands.__path__):
        command = main.get_command(click.Context(main), module.name)
        assert isinstance(command, click.Command) and command.name == module.name


def test_help_lists_the_commands_and_an_unknown_one_is_a_usage_error():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "invert" in result.output and "evaluate" in result.output
    result = runner.invoke(main, ["captions"])
    assert result.exit_code == 2 and "No such command 'captions'" in result.output


# `python -m ktpipe` with an exit handler registered first, as a library the command imports would
ENTRY = ("import atexit, runpy, sys; atexit.register(lambda: print('exit handler ran', flush=True)); "
         "sys.argv = ['ktpipe', *sys.argv[1:]]; runpy.run_module('ktpipe', run_name='__main__')")


def run_entry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY, *args], capture_output=True, text=True, timeout=120)


def test_the_entry_point_keeps_the_status_the_output_and_the_exit_handlers():
    """`python -m ktpipe` skips the interpreter's teardown (ktpipe/__main__.py), not what an exit does."""
    done = run_entry("--version")
    assert done.returncode == 0 and "version" in done.stdout and done.stdout.endswith("exit handler ran\n")
    usage = run_entry("captions")
    assert usage.returncode == 2 and "No such command 'captions'" in usage.stderr
    assert "exit handler ran" in usage.stdout


def test_a_profiled_run_exits_the_usual_way_so_the_profile_is_written(tmp_path):
    profile = tmp_path / "ktpipe.prof"
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "ktpipe", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "version" in done.stdout
    assert profile.is_file() and profile.stat().st_size > 0
