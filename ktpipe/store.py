"""Local memo stores under `.ktpipe/store/`: results kept under a digest of everything that
determines their bytes, so a stage that reruns copies what it computed before instead of
recomputing it (`invert/`: each concept's inversion, ktpipe.transfer.invert; `embed/`: a model's
image embeddings of an evaluation set, ktpipe.eval.embeddings).

A store is a plain memo: deleting it (or a stage's `--store ''`) costs only time. It lives outside
DVC's outputs, so the stages stay in DVC's run-cache (DVC leaves a stage with a persistent output
out of it), and it is not shared: DVC's remote shares the results themselves.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

STORE_ROOT = Path(".ktpipe/store")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=65536)
def file_digest(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes (remembered per path, size and modification time in a process)."""
    return sha256_bytes(Path(path).read_bytes())


def files_digest(files: list[Path], root: Path) -> str:
    """One sha256 of files' paths (relative to `root`) and contents, in sorted order (each file's
    through `file_digest`: a checkpoint is read once per process, not once per key)."""
    lines = []
    for p in sorted(files):
        stat = p.stat()
        lines.append(f"{p.relative_to(root)}:{file_digest(p.resolve(), stat.st_size, stat.st_mtime_ns)}\n")
    return sha256_bytes("".join(lines).encode())


@functools.lru_cache(maxsize=None)
def code_digest() -> str:
    """sha256 of ktpipe's Python sources and package data and of the model libraries' versions."""
    import importlib.metadata

    package = Path(__file__).resolve().parent
    files = [p for p in package.rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".json", ".txt")
             and "__pycache__" not in p.parts]
    lines = [files_digest(files, package)]
    for dist in ("torch", "open_clip_torch", "transformers", "timm"):
        try:
            lines.append(f"{dist}={importlib.metadata.version(dist)}\n")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{dist}=-\n")
    return sha256_bytes("".join(lines).encode())


def model_digest(model_params: Any) -> str:
    """sha256 of the base model's identity: its params and, for a local checkpoint, its files' bytes."""
    parts = [json.dumps(dataclasses.asdict(model_params), sort_keys=True)]
    for ref in (model_params.pretrained, str(model_params.name).removeprefix("local-dir:")):
        path = Path(ref) if ref else None
        if path is not None and path.is_file():
            parts.append(sha256_bytes(path.read_bytes()))
        elif path is not None and path.is_dir():
            parts.append(files_digest([p for p in path.rglob("*") if p.is_file()], path))
    return sha256_bytes("\n".join(parts).encode())


def record_digest(record: dict) -> str:
    """sha256 of a JSON-able record (keys sorted; other objects by str)."""
    return sha256_bytes(json.dumps(record, sort_keys=True, default=str).encode())
