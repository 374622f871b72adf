"""Paper presets: params files under `presets/` that reproduce one table or figure each.

`apply_preset` writes one over `params.yaml`, the way a user starts a reproduction, after checking
that it loads and that no uncommitted edit of `params.yaml` would be lost.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ktpipe.errors import InputMissingError, KtpipeError
from ktpipe.params import load_params


class PresetError(KtpipeError):
    """A preset cannot be applied: unknown name, or it would overwrite uncommitted edits."""


def list_presets(presets_dir: Path) -> list[str]:
    """The preset names (file stems) in `presets_dir`, sorted."""
    return sorted(p.stem for p in Path(presets_dir).glob("*.yaml"))


def uncommitted(path: Path) -> bool:
    """Whether git reports `path` as modified or untracked (False outside a git work tree)."""
    path = Path(path).resolve()
    result = subprocess.run(["git", "status", "--porcelain", "--", path.name], cwd=path.parent,
                            capture_output=True, text=True)
    return result.returncode == 0 and bool(result.stdout.strip())


def apply_preset(name: str, presets_dir: Path = Path("presets"), params_path: Path = Path("params.yaml"),
                 force: bool = False) -> Path:
    """Copy presets/<name>.yaml over params_path; refuse an unknown name, a preset that does not
    load, or (unless `force`) a params file with uncommitted edits. Returns the preset's path."""
    source = Path(presets_dir) / f"{name}.yaml"
    if not source.is_file():
        if not Path(presets_dir).is_dir():
            raise InputMissingError(f"no presets folder at {presets_dir}: run from the repository root")
        raise PresetError(f"unknown preset {name!r}; presets: {', '.join(list_presets(presets_dir))}")
    load_params(source)  # a broken preset is an error before anything is written
    params_path = Path(params_path)
    if params_path.exists() and not force and uncommitted(params_path):
        raise PresetError(f"{params_path} has uncommitted edits that the preset would overwrite; commit them "
                          f"(or `git stash`), or pass --force")
    shutil.copyfile(source, params_path)
    return source
