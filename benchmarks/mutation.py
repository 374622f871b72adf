"""Mutation run over the method's arithmetic: does any test notice when the code is subtly wrong?

Not run in CI. Mutates, one at a time, the functions named in TARGETS (metrics, the fine-tuning
losses, the inversion objective, fine-tuning) with small AST mutations (a comparison or an
arithmetic operator swapped, a constant nudged, a sign dropped, argmax/argmin and min/max
swapped, and/or swapped, True/False flipped) and runs each target's fast tests against the mutant.
A mutant is *killed* when a test fails (or the run times out), *survived* when all pass.

Mutants live in a scratch copy of the working tree (never in it), so the checkout stays as it
is even when the run is interrupted. Heavy third-party imports load once in this process; each
mutant runs pytest in a forked child, which imports ktpipe afresh from the mutated copy.

    python benchmarks/mutation.py                   # every target
    python benchmarks/mutation.py --only losses     # targets whose file path contains 'losses'
    python benchmarks/mutation.py --list            # the mutants, without running tests

Prints one line per mutant, the killed/survived counts per file and overall, and every survivor
as `file:line  original -> mutant  (function)`. Why mutmut is not used: mutmut 3 needs its config
in pyproject.toml, copies the package into its own `mutants/` tree with trampolines around every
function, and collects coverage by running the whole test directory first (the full suite takes
over ten minutes here); a 150-line mutator restricted to named functions fits the time budget.
"""
from __future__ import annotations

import argparse
import ast
import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# file -> (functions to mutate, pytest arguments that exercise them)
TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ktpipe/eval/metrics.py": (
        ("accuracy", "per_class_accuracy"),
        ("tests/test_metrics.py", "tests/test_prediction_paths.py", "-k", "classification or score or accuracy")),
    "ktpipe/transfer/losses.py": (
        ("eq2_loss", "authors_infonce", "distillation_loss", "itm_loss", "coca_loss", "eq2_objective",
         "authors_objective"),
        ("tests/test_losses.py", "tests/test_training_checks.py", "-k",
         "infonce or eq2 or distillation or itm or coca or learns_one_concept")),
    "ktpipe/transfer/invert.py": (
        ("random_affine", "total_variation", "inversion_loss", "cosine_lr", "clip_pixel_grad"),
        ("tests/test_invert_objective.py", "tests/test_training_checks.py", "-k",
         "not progressive and not run_invert and not stage and not nan")),
    "ktpipe/transfer/finetune.py": (
        ("set_trainable", "build_optimizer", "check_objective", "temperature_of", "backward_step", "finetune",
         "minmax_png", "choose_concepts"),
        ("tests/test_training_checks.py", "tests/test_finetune_recipes.py")),
}
# Modules imported once before forking (slow to import, never mutated).
PRELOAD = ("torch", "torchvision", "numpy", "pandas", "PIL.Image", "open_clip", "pytest", "ruamel.yaml", "click",
           "safetensors.torch", "tqdm.auto", "scipy", "skimage")

COMPARE_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                 ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
               ast.FloorDiv: ast.Div, ast.Mod: ast.FloorDiv}
NAME_SWAPS = {"argmax": "argmin", "argmin": "argmax", "max": "min", "min": "max", "amax": "amin", "amin": "amax",
              "mean": "sum", "sum": "mean", "any": "all", "all": "any", "topk": "argsort"}


@dataclass(frozen=True)
class Mutant:
    file: str
    function: str
    line: int
    site: int  # index among the function's mutation sites, in ast.walk order
    what: str  # 'original -> mutant', as source


def mutations(node: ast.AST) -> list[tuple[ast.AST, str]]:
    """(mutated copy of `node`, description) for each mutation this node admits."""
    out = []
    if isinstance(node, ast.Compare) and type(node.ops[0]) in COMPARE_SWAPS:
        new = copy.deepcopy(node)
        new.ops[0] = COMPARE_SWAPS[type(node.ops[0])]()
        out.append(new)
    elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
        new = copy.deepcopy(node)
        new.op = BINOP_SWAPS[type(node.op)]()
        out.append(new)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        out.append(copy.deepcopy(node.operand))
    elif isinstance(node, ast.BoolOp):
        new = copy.deepcopy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        out.append(new)
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        out.append(ast.Constant(not node.value))
    elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        out.append(ast.Constant(node.value + 1 if isinstance(node.value, int) else (node.value * 2 or 1.0)))
    elif isinstance(node, ast.Attribute) and node.attr in NAME_SWAPS:
        new = copy.deepcopy(node)
        new.attr = NAME_SWAPS[node.attr]
        out.append(new)
    elif isinstance(node, ast.Name) and node.id in ("max", "min", "any", "all", "sum") and isinstance(node.ctx, ast.Load):
        out.append(ast.Name(NAME_SWAPS[node.id], ast.Load()))
    return [(new, f"{ast.unparse(node)} -> {ast.unparse(new)}") for new in out]


def mutable_nodes(function: ast.FunctionDef) -> list[ast.AST]:
    """The function body's nodes, leaving out docstrings, f-strings (messages) and decorators."""
    skip = set()
    for node in ast.walk(function):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(n) for n in ast.walk(node))
    return [n for stmt in function.body for n in ast.walk(stmt) if id(n) not in skip]


def find_function(tree: ast.Module, name: str) -> ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise SystemExit(f"function {name} not found")


def list_mutants(file: str, functions: tuple[str, ...], root: Path) -> list[Mutant]:
    tree = ast.parse((root / file).read_text())
    found = []
    for name in functions:
        site = 0
        for node in mutable_nodes(find_function(tree, name)):
            for _, what in mutations(node):
                found.append(Mutant(file, name, node.lineno, site, what))
                site += 1
    return found


def mutated_source(mutant: Mutant, source: str) -> str:
    """The module with the mutant's one node replaced (line numbers as in the original)."""
    tree = ast.parse(source)
    site = 0
    for node in mutable_nodes(find_function(tree, mutant.function)):
        for new, _ in mutations(node):
            if site == mutant.site:
                replace(tree, node, new)
                return ast.unparse(ast.fix_missing_locations(tree))
            site += 1
    raise RuntimeError(f"mutation site {mutant.site} of {mutant.function} vanished")


def replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, field, new)
                return
            if isinstance(value, list) and any(v is old for v in value):
                value[[i for i, v in enumerate(value) if v is old][0]] = new
                return


def copy_tree(dest: Path) -> None:
    """The working tree's tracked and untracked files (not data, models or outputs) into `dest`."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    for name in listed:
        src = REPO / name
        if name and src.is_file() and not name.startswith(("data/", "models/", "metrics/", "reports/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_tests(root: Path, args: tuple[str, ...], timeout: float) -> str:
    """'passed', 'failed' or 'timeout' of pytest `args` in a forked child importing ktpipe from `root`."""
    pid = os.fork()
    if pid == 0:  # child: fresh ktpipe imports from the mutated copy
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1), os.dup2(devnull, 2)
        os.chdir(root)
        sys.path[:0] = [str(root), str(root / "tests")]
        import pytest
        code = pytest.main(["-n", "0", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore", *args])
        os._exit(int(code))
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "passed" if os.waitstatus_to_exitcode(status) == 0 else "failed"
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "timeout"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the targets whose path contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants only")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per mutant's test run")
    parser.add_argument("--survivors-of", type=Path, help="rerun only the survivors listed in this earlier output")
    opts = parser.parse_args()
    targets = {f: t for f, t in TARGETS.items() if opts.only in f}
    scratch = Path(tempfile.mkdtemp(prefix="ktpipe-mutation-"))
    try:
        copy_tree(scratch)
        mutants = {f: list_mutants(f, functions, scratch) for f, (functions, _) in targets.items()}
        if opts.survivors_of:
            earlier = set(opts.survivors_of.read_text().splitlines())
            mutants = {f: [m for m in ms if f"survived {m.file}:{m.line}  {m.what}  ({m.function})" in earlier]
                       for f, ms in mutants.items()}
            mutants = {f: ms for f, ms in mutants.items() if ms}
        if opts.list:
            for m in (m for ms in mutants.values() for m in ms):
                print(f"{m.file}:{m.line}  {m.what}  ({m.function})")
            return
        run(targets, mutants, scratch, opts.timeout)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(targets: dict, mutants: dict[str, list[Mutant]], root: Path, timeout: float) -> None:
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"})
    for name in PRELOAD:
        __import__(name)
    survivors, counts = [], {}
    for file, found in mutants.items():
        original = (root / file).read_text()
        baseline = run_tests(root, targets[file][1], timeout)
        if baseline != "passed":
            raise SystemExit(f"{file}: its tests do not pass unmutated ({baseline}); fix them first")
        counts[file] = {"killed": 0, "survived": 0}
        for m in found:
            (root / file).write_text(mutated_source(m, original))
            try:
                result = run_tests(root, targets[file][1], timeout)
            finally:
                (root / file).write_text(original)
            key = "survived" if result == "passed" else "killed"
            counts[file][key] += 1
            if key == "survived":
                survivors.append(m)
            print(f"{key} {m.file}:{m.line}  {m.what}  ({m.function}){' [timeout]' if result == 'timeout' else ''}",
                  flush=True)
    print("\nfile                          killed survived")
    for file, c in counts.items():
        print(f"{file:30s} {c['killed']:6d} {c['survived']:8d}")
    print(f"{'total':30s} {sum(c['killed'] for c in counts.values()):6d} "
          f"{sum(c['survived'] for c in counts.values()):8d}")
    print("\nsurvivors:" if survivors else "\nno survivors")
    for m in survivors:
        print(f"  {m.file}:{m.line}  {m.what}  ({m.function})")


if __name__ == "__main__":
    main()
