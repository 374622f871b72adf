"""What one evaluation embeds once.

- Class-prompt embeddings: each class's prompts are encoded once per evaluated model, however
  many sets name the class (Table 1 scores ImageNet's 1,000 classes as the ImageNet set's classes
  and as candidates of the rare-concept set: one encoding each).
- Image embeddings: a dual encoder's (N, D) embeddings of a set's images go to a store on disk
  (ktpipe/store.py) under a digest of the model's weights, ktpipe's code, the device, the batch
  size and the images' bytes. A model evaluated again embeds no image it embedded before: the
  baseline after new templates, another set beside, an edited concept description, in every
  experiment of a sweep that reruns it.

Each entry is the tensor exactly as computed, so an evaluation served from the store writes the
bytes a recomputation on the same machine writes.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ktpipe import distributed
from ktpipe.errors import warn
from ktpipe.store import STORE_ROOT, code_digest, file_digest, record_digest

DEFAULT_STORE = STORE_ROOT / "embed"


class EmbeddingCache:
    """One evaluated model's class rows (in memory) and image embeddings (in `store`, under
    `model_key`, the digest of its weights, and the precision it runs in; either None: images are
    embedded every time)."""

    def __init__(self, model_key: str | None = None, store: str | Path | None = None, precision: str = "fp32"):
        self.model_key, self.precision = model_key, precision
        self.store = Path(store) if store and model_key else None
        self.rows: dict[tuple[str, ...], torch.Tensor] = {}
        self.reused_images = 0  # images whose embeddings came from the store

    @torch.no_grad()
    def class_embeddings(self, model, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        """(K, D): per class, the renormalized mean of its prompts' embeddings, encoding each
        class's prompts (one batch, as without the cache) only the first time."""
        for class_prompts in map(tuple, prompts):
            if class_prompts not in self.rows:
                self.rows[class_prompts] = F.normalize(model.encode_texts(list(class_prompts)).float().mean(0), dim=-1)
        return torch.stack([self.rows[tuple(p)] for p in prompts])

    def image_embeddings(self, model, paths: Sequence[str], batch_size: int,
                         compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`compute()`'s (N, D) embeddings of the images `paths`, from the store when it holds them."""
        if self.store is None:
            return compute()
        entry = self.store / f"{images_key(self.model_key, model, paths, batch_size, self.precision)}.safetensors"
        if distributed.broadcast_object(entry.is_file()):  # over several processes, rank 0 decides for all: a
            # rank that computed while another read would wait for it at the gather forever
            from safetensors.torch import load_file

            self.reused_images += len(paths)
            # a fresh allocation, as computed embeddings have: matrix products over the loaded tensor's
            # buffer (aligned to 8 bytes in the file, not to the allocator's 64) round differently, and
            # the demo CoCa's near-tied class scores flipped 18 of 550 predictions
            return load_file(str(entry))["embeddings"].clone()
        embeddings = compute()
        if distributed.is_main():
            save_entry(entry, embeddings)
        return embeddings


def images_key(model_key: str, model, paths: Sequence[str], batch_size: int, precision: str = "fp32") -> str:
    """The store key of a model's embeddings of `paths`: its weights' digest, the code, the device
    and dtype its weights are on, the precision it runs in, the batch size (rounding can depend on
    it), the torch.compile backend of its towers (ktpipe.precision.compile_towers) and every image's bytes."""
    weight = next(model.module.parameters())
    images = []
    for path in paths:
        stat = os.stat(path)
        images.append(file_digest(Path(path).resolve(), stat.st_size, stat.st_mtime_ns))
    return record_digest({"model": model_key, "code": code_digest(), "device": weight.device.type,
                          "dtype": str(weight.dtype), "precision": precision, "batch_size": batch_size,
                          "compile": getattr(model, "compiled_with", None), "images": images})


def save_entry(entry: Path, embeddings: torch.Tensor) -> None:
    """Write one store entry whole (a temporary file renamed over it: a crash leaves no half entry)."""
    from safetensors.torch import save_file

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        save_file({"embeddings": embeddings.contiguous()}, str(tmp))
        os.replace(tmp, entry)
    except OSError as error:  # a full or read-only store costs time, never the evaluation
        tmp.unlink(missing_ok=True)
        warn(f"image embeddings not stored in {entry.parent}: {error}")
