"""benchmarks/scale.py measures what it says: its FLOP count of an inversion step is the step's
forward and backward through the visual tower, and its two zero-shot evaluations (ktpipe's and
CLIP_benchmark's) classify the same images with the same model alike. On the tiny random-init CLIP
of tests/conftest.py, each part in this process (the script spawns one process per part)."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # the script's own imports (devices.py); spawned parts need it too
spec = importlib.util.spec_from_file_location("scale", REPO / "benchmarks/scale.py")
scale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scale)


@pytest.fixture
def tiny(tiny_checkpoint) -> str:
    return f"local-dir:{tiny_checkpoint}"


def test_an_inversion_step_counts_a_forward_and_a_backward_through_the_visual_tower(tiny):
    model = scale.build(tiny, "cpu")
    samples = 3
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.module.encode_image(torch.rand(samples, 3, model.image_size, model.image_size))
    forward = counter.get_total_flops()
    step = scale.step_flops(model, samples)
    # the backward to the pixels costs what the forward does (frozen weights: no weight gradients);
    # attention's backward a little more
    assert 2.0 * forward <= step <= 2.3 * forward, (step, forward)
    assert scale.step_flops(model, 2 * samples) == pytest.approx(2 * step, rel=0.02)  # per image


def test_both_evaluations_classify_the_same_images_alike(tiny):
    pytest.importorskip("clip_benchmark")
    job = {"device": "cpu", "threads": None, "precision": "fp32", "pretrained": None, "model": tiny, "images": 12,
           "batch": 5, "classes": 3, "templates": 2, "workers": 0}
    ours, theirs = (scale.eval_part({**job, "runner": runner}) for runner in ("ktpipe", "clip_benchmark"))
    assert ours["labels"] == theirs["labels"] and len(ours["predictions"]) == 12
    same = sum(a == b for a, b in zip(ours["predictions"], theirs["predictions"]))
    assert same >= 11, (ours["predictions"], theirs["predictions"])  # resizing may flip a near tie
    assert ours["images_per_s"] > 0 and theirs["images_per_s"] > 0


def test_the_evaluation_comparison_without_clip_benchmark_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "clip_benchmark", None)  # import fails
    with pytest.raises(SystemExit) as exit_info:
        scale.parse_args(["--parts", "eval"])
    assert exit_info.value.code == 2 and "pip install clip-benchmark" in capsys.readouterr().err
    assert scale.parse_args(["--parts", "invert", "flops"]).parts == ["invert", "flops"]
