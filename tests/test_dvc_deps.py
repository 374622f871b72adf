"""Every `dvc.yaml` stage lists, in its `deps`, the code its command runs.

For each stage the script its `cmd` runs (`python stages/X.py ...`) is read with `ast` (nothing
is imported, so this is fast and needs no torch), and the `ktpipe` modules it imports are
followed transitively: `import a.b`, `from a.b import c` (where `c` may be a submodule),
relative imports, `importlib.import_module("ktpipe...")` and `resources.files("ktpipe...")`
with a literal name, and imports inside functions (a lazy import still runs in the stage).
Importing `ktpipe.x.y` also runs `ktpipe/x/__init__.py` and `ktpipe/__init__.py`, so those
count too. Imports under `if TYPE_CHECKING:` never run and do not count.

A module file is covered when the file itself or a folder above it (`ktpipe/models`,
`ktpipe/eval`) is in the stage's deps; the script `stages/X.py` must be listed as well.
Data files a module reads (templates, the demo world, ...) are out of scope here.

One lazy import is counted only for the stage that can reach it (`LAZY_ONLY`):
`ktpipe.captions.complete_concepts` imports the LLM describer (`ktpipe/describe.py`), and only
`run_captions`, i.e. the captions stage, calls it; counting it for every stage that imports
`ktpipe.captions` would make training rerun on an edit to a module training never runs. The
exemption is checked: the test fails if the lazy import moves, or if anything else starts
calling `complete_concepts` or `run_captions` from code another stage runs.

`ktpipe/__init__.py` is exempt while it is trivial (a docstring and constant assignments such
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
SCRIPT = re.compile(r"\bpython3?\s+(stages/[\w/.-]+\.py)\b")

# (file, function, lazily imported module, the only caller from outside) -> stages that run it
LAZY_ONLY = {
    ("ktpipe/captions.py", "complete_concepts", "ktpipe.describe", "run_captions"): {"captions"},
}


def load_stages(dvc_yaml: Path = REPO / "dvc.yaml") -> dict[str, dict]:
    """Stage name -> {"cmd": str, "deps": [str]}; a `foreach` stage is read from its `do` body
    (its `${item}`/`${key}` templating only touches data paths, never the script or the code)."""
    stages = YAML(typ="safe").load(dvc_yaml.read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage) if "foreach" in stage else stage
        cmd = body["cmd"]
        cmd = " ".join(cmd) if isinstance(cmd, list) else str(cmd)
        deps = [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps") or []]
        out[name] = {"cmd": " ".join(cmd.split()), "deps": deps}
    return out


def stage_script(cmd: str) -> str:
    match = SCRIPT.search(cmd)
    assert match, f"no `python stages/X.py` in cmd {cmd!r}"
    return match.group(1)


def module_file(name: str, root: Path = REPO) -> str | None:
    """Repo-relative file of module `name`, if it is part of the package."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate.relative_to(root).as_posix()
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_runtime(node: ast.AST):
    """(node, enclosing function name or None) for every node, as ast.walk would give them,
    minus the bodies of `if TYPE_CHECKING:` blocks (their `else` still runs)."""
    stack = [(node, None)]
    while stack:
        node, func = stack.pop()
        yield node, func
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack += [(n, func) for n in [node.test, *node.orelse]]
            continue
        inner = node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
        stack += [(n, inner) for n in ast.iter_child_nodes(node)]


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@functools.lru_cache(maxsize=None)
def _parse(source: str) -> ast.Module:
    return ast.parse(source)


def imported_names(path: Path, module: str | None) -> frozenset[tuple[str, str | None]]:
    """(dotted module name, enclosing function or None) for each module `path` imports at run
    time, parent packages included."""
    return _imported_names(path.read_text(), module, path.name == "__init__.py", str(path))


@functools.lru_cache(maxsize=None)
def _imported_names(source: str, module: str | None, is_pkg: bool, path: str):
    names: set[tuple[str, str | None]] = set()
    for node, func in _walk_runtime(_parse(source)):
        found: list[str] = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                found += _with_parents(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert module, f"relative import in {path}, which is not in a package"
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found += _with_parents(target)
            # `from pkg import sub` imports the submodule sub when there is one
            found += [f"{target}.{alias.name}" for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            call = node.func
            fname = call.attr if isinstance(call, ast.Attribute) else getattr(call, "id", None)
            arg = node.args[0].value
            if fname in {"import_module", "files", "__import__"} and isinstance(arg, str):
                found += _with_parents(arg)
        names.update((name, func) for name in found)
    return frozenset(names)


def imported_files(script: str, root: Path = REPO, stage: str | None = None) -> set[str]:
    """Repo-relative package files `script` runs, transitively (the script itself excluded).

    With `stage`, a `LAZY_ONLY` import is followed only for the stages listed for it."""
    skip = {(f, fn, target) for (f, fn, target, _), stages in LAZY_ONLY.items() if stage not in stages}
    seen: set[str] = set()
    todo = [(root / script, None)]
    while todo:
        path, module = todo.pop()
        importer = path.relative_to(root).as_posix()
        for name, func in imported_names(path, module):
            if stage is not None and (importer, func, name) in skip:
                continue
            rel = module_file(name, root)
            if rel is not None and rel not in seen:
                seen.add(rel)
                todo.append((root / rel, name))
    return seen


def references(name: str, root: Path = REPO) -> set[tuple[str, str | None]]:
    """(file, enclosing function) of every use of `name` in the package and the stage scripts,
    its own `def` excluded."""
    out = set()
    for path in [*sorted((root / PACKAGE).rglob("*.py")), *sorted((root / "stages").glob("*.py"))]:
        for node, func in _walk_runtime(_parse(path.read_text())):
            used = ((isinstance(node, ast.Name) and node.id == name)
                    or (isinstance(node, ast.Attribute) and node.attr == name)
                    or (isinstance(node, ast.alias) and name in (node.name, node.asname)))
            if used:
                out.add((path.relative_to(root).as_posix(), func))
    return out


def is_trivial_init(path: Path) -> bool:
    """Only a docstring, `from __future__` and constant assignments (e.g. `__version__`)."""
    for stmt in _parse(path.read_text()).body:
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


def missing_deps(cmd: str, deps: list[str], root: Path = REPO, stage: str | None = None) -> list[str]:
    """Files the stage command runs that its deps do not cover (`stage` as in imported_files)."""
    script = stage_script(cmd)
    needed = {script} | imported_files(script, root, stage)
    if TOP_INIT in needed and is_trivial_init(root / TOP_INIT):
        needed.discard(TOP_INIT)
    return sorted(f for f in needed if not covered(f, deps))


STAGES = load_stages()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_imported_modules(name):
    stage = STAGES[name]
    missing = missing_deps(stage["cmd"], stage["deps"], stage=name)
    assert not missing, (
        f"dvc.yaml stage {name!r} runs {stage_script(stage['cmd'])}, which imports these files "
        f"its deps do not list (add them, or their package folder): {missing}")


def test_checker_catches_a_dropped_dep():
    """Dropping any module file the stage imports (e.g. `ktpipe/finetune.py` from the finetune
    stage), its package folder or its script from an in-memory copy of its deps is caught."""
    stage = copy.deepcopy(STAGES["finetune"])

    def check(deps):
        return missing_deps(stage["cmd"], deps, stage="finetune")

    assert check(stage["deps"]) == []
    runs = imported_files(stage_script(stage["cmd"]), stage="finetune")
    modules = [d for d in stage["deps"] if d in runs]
    assert "ktpipe/finetune.py" in modules and "ktpipe/params.py" in modules
    for dep in modules:
        assert check([d for d in stage["deps"] if d != dep]) == [dep]
    assert set(check([d for d in stage["deps"] if d != "ktpipe/models"])) >= {
        "ktpipe/models/__init__.py", "ktpipe/models/openclip.py"}
    assert check([d for d in stage["deps"] if d != "stages/finetune.py"]) == ["stages/finetune.py"]
    # the LLM describer counts for the captions stage, not for one that never calls it
    captions = STAGES["captions"]
    assert missing_deps(captions["cmd"], [d for d in captions["deps"] if d != "ktpipe/describe.py"],
                        stage="captions") == ["ktpipe/describe.py"]
    assert "ktpipe/describe.py" in imported_files("stages/finetune.py")
    assert "ktpipe/describe.py" not in imported_files("stages/finetune.py", stage="finetune")


@pytest.mark.parametrize("entry", sorted(LAZY_ONLY))
def test_lazy_only_exemption_still_holds(entry):
    """A LAZY_ONLY import is still a lazy import in that function, the function is only called
    through its entry point, and no other stage runs code that calls the entry point."""
    (file, func, target, caller), stages = entry, LAZY_ONLY[entry]
    assert (target, func) in imported_names(REPO / file, file[:-3].replace("/", ".")), (
        f"{file} no longer imports {target} inside {func}: update LAZY_ONLY")
    assert references(func) <= {(file, caller), (file, func)}, (
        f"{func} is called from more places than {caller}: {sorted(references(func))}")
    runs = {name: {stage_script(s["cmd"])} | imported_files(stage_script(s["cmd"]), stage=name)
            for name, s in STAGES.items() if name not in stages}
    for ref_file, _ in references(caller) - {(file, None)}:
        users = sorted(name for name, files in runs.items() if ref_file in files)
        assert not users, f"{ref_file} calls {caller}, and stages {users} run it: {target} is no longer lazy-only"


def test_checker_follows_lazy_relative_and_submodule_imports(tmp_path):
    """Imports inside functions, relative imports and `from pkg import submodule` all count;
    `if TYPE_CHECKING:` imports do not; a non-trivial `ktpipe/__init__.py` loses its exemption."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (tmp_path / "stages").mkdir()
    (pkg / "__init__.py").write_text('"""doc"""\n__version__ = "1"\n')
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text("from .. import rel\n")
    (pkg / "rel.py").write_text("")
    (pkg / "lazy.py").write_text("")
    (pkg / "typing_only.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nfrom ktpipe.sub import leaf\n"
        "if TYPE_CHECKING:\n    from ktpipe import typing_only\n"
        "def f():\n    import ktpipe.lazy\n")
    (tmp_path / "stages" / "s.py").write_text("from ktpipe.a import f\n")
    cmd = "python stages/s.py ${item} out"
    assert imported_files("stages/s.py", tmp_path) == {
        "ktpipe/__init__.py", "ktpipe/a.py", "ktpipe/sub/__init__.py", "ktpipe/sub/leaf.py",
        "ktpipe/rel.py", "ktpipe/lazy.py"}
    assert missing_deps(cmd, ["stages/s.py", "ktpipe/sub", "ktpipe/a.py", "ktpipe/rel.py"], tmp_path) == [
        "ktpipe/lazy.py"]
    assert missing_deps(cmd, ["stages/s.py", "ktpipe"], tmp_path) == []
    (pkg / "__init__.py").write_text("from ktpipe import rel\n")
    assert "ktpipe/__init__.py" in missing_deps(cmd, ["stages/s.py", "ktpipe/a.py"], tmp_path)
