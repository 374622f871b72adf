"""Narrowing a manifest: keep named classes, draw a deterministic (class-balanced) subset."""
from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Sequence

import numpy as np

from ktpipe.datasets.records import Manifest
from ktpipe.images import DatasetError

LISTED_CLASSES = 30  # how many of a set's classes an unknown-class error lists


def normalize_class(name: str) -> str:
    """Class names compare case-insensitively, with '_' and '-' as spaces."""
    return " ".join(re.split(r"[\s_-]+", name.strip().lower()))


def filter_classes(manifest: Manifest, keep: Sequence[str]) -> Manifest:
    """Only the classes named in `keep` (all classes of a duplicated name), in dataset label order."""
    available = {normalize_class(c) for c in manifest.classes}
    unknown = [c for c in keep if normalize_class(c) not in available]
    if unknown:
        listed = ", ".join(manifest.classes[:LISTED_CLASSES])
        more = " ..." if len(manifest.classes) > LISTED_CLASSES else ""
        raise DatasetError(f"set {manifest.name!r} has no class(es) {unknown}; "
                           f"its {len(manifest.classes)} classes: {listed}{more}")
    wanted = {normalize_class(c) for c in keep}
    old = [k for k, c in enumerate(manifest.classes) if normalize_class(c) in wanted]
    remap = {k: new for new, k in enumerate(old)}
    records = tuple(dataclasses.replace(r, label=remap[k])
                    for r, k in zip(manifest.records, manifest.labels) if k in remap)
    return Manifest(manifest.name, tuple(manifest.classes[k] for k in old), records)


def class_order(manifest: Manifest, label: int, seed: int) -> list[int]:
    """Record indices of one class, shuffled by a generator seeded with seed and the class name."""
    indices = [i for i, k in enumerate(manifest.labels) if k == label]
    key = zlib.crc32(manifest.classes[label].encode())
    rng = np.random.default_rng([seed, key])
    return [indices[j] for j in rng.permutation(len(indices))]


def take_subset(manifest: Manifest, size: int, seed: int) -> Manifest:
    """A deterministic class-balanced subset: round-robin over per-class seeded shuffles (for
    captioned images, which have no classes, a seeded shuffle of all images).

    The same seed gives the same subset, and a larger subset contains every smaller one.
    Records keep their original order."""
    if size >= len(manifest):
        return manifest
    if not manifest.has_labels:  # captioned images: a seeded shuffle's first `size`
        order = np.random.default_rng([seed, zlib.crc32(manifest.name.encode())]).permutation(len(manifest))
        return manifest.select(sorted(order[:size].tolist()))
    queues = [class_order(manifest, k, seed) for k in range(len(manifest.classes))]
    chosen: list[int] = []
    for round_ in range(max(map(len, queues), default=0)):
        chosen.extend(q[round_] for q in queues if round_ < len(q))
        if len(chosen) >= size:
            break
    return manifest.select(sorted(chosen[:size]))
