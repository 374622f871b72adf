"""Evaluation datasets as typed manifests: one module per format family.

records (LabeledImage, CaptionedImage, MaskedImage, Manifest, parquet IO), folders (class
folders, CSV/parquet label files), imagenet (ImageNet-1k, ImageNet-100), medical (CheXpert-5x200,
JSRT), selection (class filter, balanced subsets), sets (format registry, the data stage's
evaluation sets). Other modules import from here only.
"""
from ktpipe.datasets.records import (
    CaptionedImage,
    LabeledImage,
    Manifest,
    MaskedImage,
    build_manifest,
    read_manifest,
    write_manifest,
)
from ktpipe.datasets.selection import normalize_class
from ktpipe.datasets.sets import load_dataset, load_eval_set, run_data

__all__ = [
    "CaptionedImage",
    "LabeledImage",
    "Manifest",
    "MaskedImage",
    "build_manifest",
    "load_dataset",
    "load_eval_set",
    "normalize_class",
    "read_manifest",
    "run_data",
    "write_manifest",
]
