"""The model before transfer, as a DVC output every later stage depends on.

For a demo backend this is the tiny CLIP (ViLT, CoCa) pretrained on the demo world: the package
ships each one pretrained with its provenance (ktpipe/demo/base_models/<backend>/, written by
`ktpipe ship_base_models`), and the stage copies it when the params and code that would pretrain
it are those the record names; otherwise it pretrains, saying why. For a real backend (open_clip
weights from a hub or a file) it is `model.json`: what was loaded, its input size and parameter
count, and the checksum of a local weights file, so a changed model reruns exactly the stages
downstream of it while the weights themselves stay in the hub cache.
"""
from __future__ import annotations

import hashlib
import importlib
import sys
import time
from pathlib import Path

from ktpipe.io import atomic_dir, write_json
from ktpipe.models import load_base_model
from ktpipe.params import Params, ParamsError

REFERENCE_FILE = "model.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_model(params: Params) -> dict:
    """Load the base model once (validating name and weights) and describe it."""
    model = load_base_model(params.model)
    pretrained = params.model.pretrained
    record = {
        "backend": params.model.backend, "name": params.model.name, "pretrained": pretrained,
        "image_size": model.image_size, "kind": model.kind,
        "n_parameters": sum(p.numel() for p in model.module.parameters()),
    }
    if pretrained and Path(pretrained).is_file():
        record["sha256"] = sha256_file(Path(pretrained))
    return record


# demo backend -> module and function that pretrain it on the demo world (imported only here)
DEMO_PRETRAINING = {"demo": ("ktpipe.demo.pretrain", "run_pretrain"),
                    "demo_vilt": ("ktpipe.demo.pretrain_cross", "run_pretrain_cross"),
                    "demo_coca": ("ktpipe.demo.pretrain_caption", "run_pretrain_captioner")}


def run_base_model(params: Params, out_dir: Path, log_path: Path, world_path: Path | None = None) -> dict:
    """Copy the shipped demo model, pretrain one, or record the real model that params name."""
    if params.model.backend in DEMO_PRETRAINING:
        if Path(params.model.pretrained or "") != Path(out_dir):
            raise ParamsError(f"for the {params.model.backend} backend, params key 'model.pretrained' must be "
                              f"{str(out_dir)!r} (the base_model stage's output), got {params.model.pretrained!r}")
        from ktpipe.demo.shipped import copy_shipped, mismatch, pretraining_record, read_shipped

        record = pretraining_record(params, world_path)
        shipped = read_shipped(params.model.backend)
        reason = mismatch(shipped, record)
        if reason is None:
            return copy_shipped(shipped, Path(out_dir), Path(log_path))
        print(f"ktpipe: pretraining the {params.model.backend} base model ({reason}); the shipped one took "
              f"{shipped['seconds'] if shipped else '?'} s on 2 CPU cores", file=sys.stderr)
        return pretrain_demo(params, Path(out_dir), Path(log_path), world_path)
    start = time.time()
    record = describe_model(params)
    with atomic_dir(out_dir) as tmp:  # only what the params determine: a rerun writes the same bytes
        write_json(tmp / REFERENCE_FILE, record)
    summary = {**record, "seconds": round(time.time() - start, 1)}
    write_json(log_path, summary)
    return summary


def pretrain_demo(params: Params, out_dir: Path, log_path: Path, world_path: Path | None) -> dict:
    """Pretrain a demo model from scratch (its backend's pretraining function)."""
    module, function = DEMO_PRETRAINING[params.model.backend]
    return getattr(importlib.import_module(module), function)(params, Path(out_dir), Path(log_path), world_path)
