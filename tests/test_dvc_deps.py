"""Every `dvc.yaml` stage lists, in its `deps`, the code its command runs.

A stage's `cmd` runs one module of the `stages/` folder (`python -m stages.X ...`): that runs
`stages/__init__.py` and `stages/X.py`. From those entry files the `ktpipe` (and `stages`)
modules they import are followed transitively, read with `ast` (nothing is imported, so this is
fast and needs no torch): `import a.b`, `from a.b import c` (where `c` may be a submodule),
relative imports, `importlib.import_module("ktpipe...")` and `resources.files("ktpipe...")` with
a literal name, and imports inside functions (a lazy import still runs in the stage). Importing
`ktpipe.x.y` also runs `ktpipe/x/__init__.py` and `ktpipe/__init__.py`, so those count too.
Imports under `if TYPE_CHECKING:` never run and do not count.

A module file is covered when the file itself or a folder above it (`ktpipe/models`,
`ktpipe/eval`) is in the stage's deps; the entry files must be listed as well. Data files a
module reads (templates, the demo world, ...) are out of scope here.

`ktpipe/__init__.py` and `stages/__init__.py` are exempt while they are trivial (a docstring and constant assignments such
as `__version__`, no imports and no code): listing it would make every stage rerun on a version
bump and buys nothing. The exemption is checked, not assumed: once the file gains an import or
any other statement it counts like any other module and every stage must list it (or `ktpipe`).
"""
from __future__ import annotations

import ast
import copy
import functools
import re
from pathlib import Path

import pytest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "ktpipe"
TOP_INIT = f"{PACKAGE}/__init__.py"
STAGES_PACKAGE = "stages"
STAGES_INIT = f"{STAGES_PACKAGE}/__init__.py"
COMMAND = re.compile(rf"\bpython3?\s+-m\s+{STAGES_PACKAGE}\.([A-Za-z_]\w*)")
TRIVIAL_INITS = (TOP_INIT, STAGES_INIT)  # exempt while they hold no code


def load_stages(dvc_yaml: Path = REPO / "dvc.yaml") -> dict[str, dict]:
    """Stage name -> {"cmd": str, "deps": [str]}; a `foreach` stage is read from its `do` body
    (its `${item}`/`${key}` templating only touches arguments, never the command or the code)."""
    stages = YAML(typ="safe").load(dvc_yaml.read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage) if "foreach" in stage else stage
        cmd = body["cmd"]
        cmd = " ".join(cmd) if isinstance(cmd, list) else str(cmd)
        deps = [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps") or []]
        out[name] = {"cmd": " ".join(cmd.split()), "deps": deps}
    return out


def stage_command(cmd: str) -> str:
    """The stage module a stage's cmd runs (`python -m stages.finetune ...` -> finetune)."""
    match = COMMAND.search(cmd)
    assert match, f"no `python -m {STAGES_PACKAGE}.<stage>` in cmd {cmd!r}"
    return match.group(1)


def command_module(command: str) -> str:
    """The file `python -m stages.<command>` runs."""
    return f"{STAGES_PACKAGE}/{command}.py"


def entry_files(cmd: str) -> list[str]:
    """Files a stage's cmd runs before any import is followed."""
    return [STAGES_INIT, command_module(stage_command(cmd))]


def module_file(name: str, root: Path = REPO) -> str | None:
    """Repo-relative file of module `name`, if it is part of the package."""
    if name.split(".")[0] not in (PACKAGE, STAGES_PACKAGE):
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate.relative_to(root).as_posix()
    return None


def module_name(file: str) -> str:
    """Dotted name of a repo-relative package file (`ktpipe/commands/__init__.py` -> ktpipe.commands)."""
    parts = file[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_runtime(node: ast.AST):
    """Every node, as ast.walk would give them, minus the bodies of `if TYPE_CHECKING:` blocks
    (their `else` still runs)."""
    stack = [node]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack += [node.test, *node.orelse]
            continue
        stack += list(ast.iter_child_nodes(node))


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_names(path: Path, module: str) -> frozenset[str]:
    """Dotted names of the modules `path` imports at run time, parent packages included."""
    return _imported_names(path.read_text(), module, path.name == "__init__.py", str(path))


@functools.lru_cache(maxsize=None)
def _imported_names(source: str, module: str, is_pkg: bool, path: str) -> frozenset[str]:
    names: set[str] = set()
    for node in _walk_runtime(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.update(_with_parents(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names.update(_with_parents(target))
            # `from pkg import sub` imports the submodule sub when there is one
            names.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            call = node.func
            fname = call.attr if isinstance(call, ast.Attribute) else getattr(call, "id", None)
            arg = node.args[0].value
            if fname in {"import_module", "files", "__import__"} and isinstance(arg, str):
                names.update(_with_parents(arg))
    return frozenset(names)


def imported_files(entries: list[str], root: Path = REPO) -> set[str]:
    """Repo-relative package files that running the `entries` runs, transitively (the entries
    included)."""
    seen: set[str] = set(entries)
    todo = list(entries)
    while todo:
        file = todo.pop()
        for name in imported_names(root / file, module_name(file)):
            rel = module_file(name, root)
            if rel is not None and rel not in seen:
                seen.add(rel)
                todo.append(rel)
    return seen


def is_trivial_init(path: Path) -> bool:
    """Only a docstring, `from __future__` and constant assignments (e.g. `__version__`)."""
    for stmt in ast.parse(path.read_text()).body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue
        if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
            continue
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and isinstance(stmt.value, ast.Constant):
            continue
        return False
    return True


def covered(file: str, deps: list[str]) -> bool:
    listed = {d.rstrip("/") for d in deps}
    return any(p in listed for p in [file, *(p.as_posix() for p in Path(file).parents)])


def stage_files(cmd: str, root: Path = REPO) -> set[str]:
    """Package files a stage's cmd runs (the package `__init__.py` files left out while trivial)."""
    needed = imported_files(entry_files(cmd), root)
    for init in TRIVIAL_INITS:
        if init in needed and is_trivial_init(root / init):
            needed.discard(init)
    return needed


def missing_deps(cmd: str, deps: list[str], root: Path = REPO) -> list[str]:
    """Files the stage command runs that its deps do not cover."""
    return sorted(f for f in stage_files(cmd, root) if not covered(f, deps))


def click_command_name(path: Path) -> str | None:
    """The name in `@click.command("name")` on the module's `command` function, if any."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == "command":
            for deco in node.decorator_list:
                if (isinstance(deco, ast.Call) and getattr(deco.func, "attr", None) == "command"
                        and deco.args and isinstance(deco.args[0], ast.Constant)):
                    return deco.args[0].value
    return None


STAGES = load_stages()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_runs_a_stage_module(name):
    """The stage's module exists and its click command carries the module's name (the `ktpipe`
    script finds it by that name), and the stage is named after it (`evaluate_baseline` and
    `base_model_family@` run the module of their prefix)."""
    command = stage_command(STAGES[name]["cmd"])
    path = REPO / command_module(command)
    assert path.is_file(), f"dvc.yaml stage {name!r} runs `python -m stages.{command}`, but {command_module(command)} is missing"
    assert click_command_name(path) == command
    assert name.startswith(command) or command.startswith(name)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_imported_modules(name):
    stage = STAGES[name]
    missing = missing_deps(stage["cmd"], stage["deps"])
    assert not missing, (
        f"dvc.yaml stage {name!r} runs `python -m stages.{stage_command(stage['cmd'])}`, which imports these files "
        f"its deps do not list (add them, or their package folder): {missing}")


def test_checker_catches_a_dropped_dep():
    """Dropping any module file the stage imports (e.g. `ktpipe/transfer/finetune.py` from the finetune
    stage), its package folder or an entry file from an in-memory copy of its deps is caught."""
    stage = copy.deepcopy(STAGES["finetune"])

    def check(deps):
        return missing_deps(stage["cmd"], deps)

    assert check(stage["deps"]) == []
    runs = stage_files(stage["cmd"])
    modules = [d for d in stage["deps"] if d in runs]
    assert {"ktpipe/transfer/finetune.py", "ktpipe/params.py", "ktpipe/cli.py", "stages/finetune.py"} <= set(modules)
    for dep in modules:
        assert check([d for d in stage["deps"] if d != dep]) == [dep]
    assert set(check([d for d in stage["deps"] if d != "ktpipe/models"])) >= {
        "ktpipe/models/__init__.py", "ktpipe/models/openclip.py"}
    # the LLM describer (transformers) counts for the captions stage, whose command imports it,
    # and for no training stage: only that command imports it, not ktpipe/concepts.py
    concepts = STAGES["captions"]
    assert missing_deps(concepts["cmd"], [d for d in concepts["deps"] if d != "ktpipe/describe.py"]) == [
        "ktpipe/describe.py"]
    assert "ktpipe/concepts.py" in runs and "ktpipe/describe.py" not in runs


def test_checker_follows_lazy_relative_and_submodule_imports(tmp_path):
    """The command module runs as well as the group; imports inside functions, relative imports
    and `from pkg import submodule` all count; `if TYPE_CHECKING:` imports do not; a non-trivial
    `ktpipe/__init__.py` loses its exemption."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "commands").mkdir()
    (pkg / "__init__.py").write_text('"""doc"""\n__version__ = "1"\n')
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text('"""doc"""\n')
    (tmp_path / "stages" / "s.py").write_text("from ktpipe.cli import run\ndef command():\n    from ktpipe.a import f\n")
    (tmp_path / "stages" / "other.py").write_text("from ktpipe import unused\n")
    (pkg / "cli.py").write_text("import click\n")
    (pkg / "unused.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text("from .. import rel\n")
    (pkg / "rel.py").write_text("")
    (pkg / "lazy.py").write_text("")
    (pkg / "typing_only.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nfrom ktpipe.sub import leaf\n"
        "if TYPE_CHECKING:\n    from ktpipe import typing_only\n"
        "def f():\n    import ktpipe.lazy\n")
    cmd = "python -m stages.s ${item} out"
    entries = ["stages/__init__.py", "stages/s.py"]
    assert entry_files(cmd) == entries
    assert imported_files(entries, tmp_path) == {
        *entries, "ktpipe/__init__.py", "ktpipe/cli.py", "ktpipe/a.py", "ktpipe/sub/__init__.py", "ktpipe/sub/leaf.py",
        "ktpipe/rel.py", "ktpipe/lazy.py"}
    deps = ["stages/s.py", "ktpipe/cli.py", "ktpipe/sub", "ktpipe/a.py", "ktpipe/rel.py"]
    assert missing_deps(cmd, deps, tmp_path) == ["ktpipe/lazy.py"]
    assert missing_deps(cmd, [*deps[1:], "ktpipe/lazy.py"], tmp_path) == ["stages/s.py"]
    assert missing_deps(cmd, ["ktpipe", "stages/s.py"], tmp_path) == []
    (pkg / "__init__.py").write_text("from ktpipe import rel\n")
    assert "ktpipe/__init__.py" in missing_deps(cmd, [*entries, "ktpipe/a.py"], tmp_path)


def test_dvc_lock_holds_only_the_stages_of_dvc_yaml():
    """dvc.lock keeps the entry of a stage that dvc.yaml no longer has (renamed or removed); every
    stage run parses and rewrites the whole lock, so stale entries cost each stage time."""
    stages = {name.split("@")[0] for name in YAML(typ="safe").load((REPO / "dvc.lock").read_text())["stages"]}
    assert stages <= set(STAGES), f"dvc.lock has stages dvc.yaml lacks: {sorted(stages - set(STAGES))}"
