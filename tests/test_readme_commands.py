"""Every shell command the README (and docs/, once it exists) shows a user is checked.

Each ```bash block carries a marker on the line above its fence:
`<!-- checked: run by tests/<file>.py[, tests/<other>.py] -->` (those tests, or CI's `.ci/run`, run
the block's commands in a temporary clone: the files must exist and name each command's
subcommand), or
`<!-- checked: needs <a GPU, hub weights or the datasets> -->` (it cannot run here). Whatever
the marker, every command is read against the project as it is: a `ktpipe` command and its
options, a `dvc repro` stage, a `dvc exp run -S` params key, a preset, and a project path must
all exist, so a renamed stage, key, option or file breaks this test instead of a user's run.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import click
import pytest
from ruamel.yaml import YAML

from conftest import REPO
from stages.cli import main as cli

MARKER = re.compile(r"<!-- checked: (run by ((?:tests/\S+\.py|\.ci/run)(?:, (?:tests/\S+\.py|\.ci/run))*)|needs [^>]+) -->")
FENCE = re.compile(r"^(\s*)```bash\s*$")
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]
PROJECT_DIRS = ("reports/", "metrics/", "data/", "models/", "presets/", "captions/", "stages/", "docs/", "ktpipe/", "benchmarks/", "tests/")


def bash_blocks(path: Path) -> list[tuple[int, str | None, list[str]]]:
    """(line number, marker or None, command lines) of every ```bash block of a Markdown file."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        above = next((line for line in reversed(lines[:i]) if line.strip()), "")
        marker = MARKER.search(above)
        body, i = [], i + 1
        while not lines[i].strip().startswith("```"):
            body.append(lines[i].strip())
            i += 1
        blocks.append((i, marker.group(1) if marker else None, commands(body)))
        i += 1
    return blocks


def commands(body: list[str]) -> list[list[str]]:
    """Shell words of each simple command (comments dropped, `&&` and `;` split, loops' bodies kept)."""
    out = []
    for line in body:
        line = line.split(" #")[0].split("# ")[0] if not line.startswith("#") else ""
        for part in re.split(r"&&|;|\bdo\b|\bdone\b", line):
            words = shlex.split(part.strip()) if part.strip() else []
            if words and words[0] not in ("for", "export", "cd", "git"):
                out.append(words)
    return out


ALL_BLOCKS = [(path, *block) for path in DOCS for block in bash_blocks(path)]
IDS = [f"{path.name}:{line}" for path, line, _, _ in ALL_BLOCKS]


@pytest.mark.parametrize("path, line, marker, cmds", ALL_BLOCKS, ids=IDS)
def test_block_is_marked_and_its_test_runs_its_commands(path, line, marker, cmds):
    assert marker, f"{path.name}:{line}: mark the block with <!-- checked: run by tests/... --> or <!-- checked: needs ... -->"
    if marker.startswith("run by"):
        files = [REPO / name for name in MARKER.search(f"<!-- checked: {marker} -->").group(2).split(", ")]
        for file in files:
            assert file.is_file(), f"{path.name}:{line}: {file} does not exist"
        text = "\n".join(file.read_text() for file in files)
        for words in cmds:
            if words[0] in ("dvc", "ktpipe"):
                sub = next(w for w in words[1:] if not w.startswith("-"))
                assert f'"{sub}"' in text or f" {sub} " in text, \
                    f"{path.name}:{line}: {', '.join(f.name for f in files)} never run `{words[0]} {sub}`"


@cache
def params_of(preset: str | None) -> dict:
    source = REPO / "params.yaml" if preset is None else REPO / "presets" / f"{preset}.yaml"
    return YAML(typ="safe", pure=True).load(source.read_text())


@cache
def stage_list(preset: str | None) -> str:
    """`dvc stage list` of dvc.yaml under the demo params or a preset, in a scratch copy."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(REPO / "dvc.yaml", Path(tmp) / "dvc.yaml")
        shutil.copy(REPO / "params.yaml" if preset is None else REPO / "presets" / f"{preset}.yaml",
                    Path(tmp) / "params.yaml")
        run = lambda *a: subprocess.run([sys.executable, "-m", "dvc", *a], cwd=tmp, capture_output=True, text=True)
        run("init", "--no-scm", "-q")
        listed = run("stage", "list")
        assert listed.returncode == 0, listed.stderr
        return listed.stdout


def stage_names(preset: str | None) -> set[str]:
    return {line.split()[0] for line in stage_list(preset).splitlines() if line.strip()}


@cache
def dvc_outputs() -> tuple[str, ...]:
    """Every output and metrics path of the demo's stages (`Outputs a, b; Reports c`)."""
    paths = []
    for line in stage_list(None).splitlines():
        for part in line.split(None, 1)[1].split(";"):
            paths += [p.strip().rstrip("…") for p in part.strip().split(None, 1)[1].split(",")]
    return tuple(p for p in paths if p)


def has_key(params: dict, key: str) -> bool:
    node = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def tracked(path: str) -> bool:
    """A project path: in the work tree, or a DVC output of the demo (or a file under one)."""
    path = path.rstrip("/")
    return (REPO / path).exists() or any(path == out or path.startswith(out + "/") or out.startswith(path + "/")
                                         for out in dvc_outputs())


def check_ktpipe(words: list[str]) -> list[str]:
    name = words[1] if len(words) > 1 else None
    command = cli.get_command(click.Context(cli), name) if name else None
    if command is None:
        return [f"`ktpipe {name}`: no such command ({', '.join(cli.list_commands(click.Context(cli)))})"]
    options = {opt for p in command.params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}
    return [f"`ktpipe {name}` has no option {w.split('=')[0]}" for w in words[2:]
            if w.startswith("--") and w.split("=")[0] not in options]


def check_dvc(words: list[str], preset: str | None) -> list[str]:
    problems, args = [], words[1:]
    if args[:1] == ["repro"]:
        stages = [w for w in args[1:] if not w.startswith("-")]
        known = stage_names(preset)
        problems += [f"`dvc repro {s}`: no stage {s!r}" for s in stages if s not in known and "<" not in s]
    if args[:2] == ["exp", "run"]:
        for i, w in enumerate(args):
            if w == "-S" and i + 1 < len(args):
                key = args[i + 1].split("=")[0]
                if not has_key(params_of(preset), key):
                    problems.append(f"`dvc exp run -S {key}=...`: no params key {key!r} in "
                                    f"{'params.yaml' if preset is None else f'presets/{preset}.yaml'}")
    return problems


def check_paths(words: list[str]) -> list[str]:
    paths = [w for w in words if w.startswith(PROJECT_DIRS) and not re.search(r"[<$*{]", w)]
    return [f"path {p} does not exist (git or a DVC output)" for p in paths if not tracked(p)]


@pytest.mark.parametrize("path, line, marker, cmds", ALL_BLOCKS, ids=IDS)
def test_commands_name_what_exists(path, line, marker, cmds):
    problems, preset = [], None
    for words in cmds:
        if words[0] == "ktpipe" and words[1:2] == ["preset"] and len(words) > 2:
            preset = words[2]
            if not (REPO / "presets" / f"{preset}.yaml").is_file():
                problems.append(f"no preset {preset!r}")
                preset = None
        if words[0] == "cp" and words[1].startswith("presets/"):
            preset = Path(words[1]).stem
        if words[0] == "ktpipe" or words[:3] == ["python", "-m", "stages"]:
            problems += check_ktpipe(words if words[0] == "ktpipe" else ["ktpipe", *words[3:]])
        if words[0] == "dvc":
            problems += check_dvc(words, preset)
        problems += check_paths(words)
    assert not problems, f"{path.name}:{line}:\n" + "\n".join(problems)


def test_the_checker_catches_a_renamed_stage_key_option_and_preset():
    bad = [["dvc", "repro", "evaluate@nowhere"], ["dvc", "exp", "run", "-S", "lr_typo=1"],
           ["ktpipe", "finetune", "--no-such-option"], ["ktpipe", "nosuchcommand"]]
    assert len(check_dvc(bad[0], None)) == 1 and len(check_dvc(bad[1], None)) == 1
    assert check_ktpipe(bad[2]) and check_ktpipe(bad[3])
    assert check_paths(["cat", "reports/no_such_report.md"]) and not check_paths(["cat", "reports/results.md"])
    assert not check_dvc(["dvc", "exp", "run", "-S", "families.vilt.lr=1e-3"], None)
