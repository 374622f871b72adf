"""The GPU fast paths, each a param, agree with the plain path on the CPU: mixed precision
(ktpipe/precision.py; `invert.precision`, `finetune.precision`, `evaluate.precision`): bf16 and fp16
autocast for inversion, fine-tuning and evaluation within the tolerances below, on the tiny
random-init CLIP; torch.compile of the towers for inversion and evaluation (`invert.compile`,
`evaluate.compile`) within 1e-6; evaluation's image decoding in worker processes into pinned memory
(`evaluate.workers`, `evaluate.pin_memory`) exactly.

Measured on the test machine (2026-12-07): image embeddings' cosine to fp32's >= 0.99998 (bf16) and
0.9999998 (fp16); after 10 inversion steps the final similarities within 0.001 and the pixels
within 0.0024 (bf16) and 0.0008 (fp16) on average; one fine-tuning step's weight update at cosine
0.994 (bf16) and 0.998 (fp16) to fp32's, with the same length within 0.1%. fp32 itself is the code
path without autocast, bit for bit (tests/test_determinism.py, and dvc.lock's unchanged reports).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import write_params
from ktpipe.eval import run_evaluate
from ktpipe.models import OpenClipModel
from ktpipe.params import FinetuneParams, InvertParams, ParamsError, load_params
from ktpipe.precision import autocast
from ktpipe.transfer.finetune import finetune
from ktpipe.transfer.invert import invert_text

HALF = ["bf16", "fp16"]
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
EMBEDDING_COSINE = 0.9999  # min cosine of an image embedding to fp32's
SIMILARITY_TOL = 0.01  # final inversion similarity, absolute
PIXEL_MEAN_TOL = 0.01  # mean absolute pixel difference after 10 inversion steps
UPDATE_COSINE = 0.98  # one fine-tuning step's weight update against fp32's
LOSS_RTOL = 0.01  # first-step loss, relative


@pytest.fixture
def load(tiny_checkpoint):
    return lambda: OpenClipModel.load(f"local-dir:{tiny_checkpoint}")


@pytest.mark.parametrize("precision", HALF)
def test_embeddings_agree_with_fp32(load, precision):
    model = load()
    pixels = torch.rand(8, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.encode_images(pixels)
        with autocast(precision, "cpu"):
            half = model.encode_images(pixels)
            texts = model.encode_texts(["a photo of a blicket.", "a red circle."])
    assert half.dtype == texts.dtype == HALF_DTYPES[precision]  # autocast acted
    assert F.cosine_similarity(reference, half.float()).min() >= EMBEDDING_COSINE


@pytest.mark.parametrize("precision", HALF)
def test_inversion_agrees_with_fp32(load, precision):
    cfg = InvertParams(steps=10, samples=2)
    pixels, sims = invert_text(load(), "a photo of a red circle", cfg, seed=0, progress=False)
    half = dataclasses.replace(cfg, precision=precision)
    half_pixels, half_sims = invert_text(load(), "a photo of a red circle", half, seed=0, progress=False)
    assert half_pixels.dtype == torch.float32 and not torch.equal(half_pixels, pixels)  # it ran in another precision
    _, start = invert_text(load(), "a photo of a red circle", dataclasses.replace(half, steps=0), seed=0, progress=False)
    assert half_sims.mean() > start.mean()  # it learns: the target similarity rose from the starting noise
    assert (half_pixels - pixels).abs().mean() < PIXEL_MEAN_TOL
    assert torch.allclose(half_sims, sims, atol=SIMILARITY_TOL)


@pytest.mark.parametrize("precision", HALF)
def test_a_finetuning_step_agrees_with_fp32(load, precision):
    cfg = FinetuneParams(epochs=1, batch_size=4, loss="authors")
    captions, labels = ["A blicket is a red circle.", "A dax is a blue square."], torch.tensor([0, 0, 1, 1])
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    updates, losses = {}, {}
    for run in ("fp32", precision):
        model = load()
        before = {k: v.clone() for k, v in model.module.visual.state_dict().items()}
        log = finetune(model, pixels, labels, captions, dataclasses.replace(cfg, precision=run), 1e-3, progress=False)
        updates[run] = torch.cat([(v - before[k]).flatten() for k, v in model.module.visual.state_dict().items()])
        losses[run] = log[0]["loss"]
    assert updates[precision].norm() > 0  # the step was taken (fp16's scaler did not skip it)
    assert F.cosine_similarity(updates[precision], updates["fp32"], dim=0) >= UPDATE_COSINE
    assert losses[precision] == pytest.approx(losses["fp32"], rel=LOSS_RTOL)


@pytest.mark.parametrize("precision", HALF)
def test_evaluation_runs_in_half_precision(rendered_project, precision):
    results = {}
    for run in ("fp32", precision):
        write_params(rendered_project, evaluate={"precision": run})
        results[run] = run_evaluate(load_params("params.yaml"), "baseline", Path("models/baseline"), Path("data/eval"),
                                    Path("data/concepts"), Path(f"metrics/{run}.json"), Path("store"))
    assert json.loads(Path(f"metrics/{precision}.json").read_text())["params"]["evaluate"]["precision"] == precision
    for name, tasks in results["fp32"]["metrics"].items():
        half = results[precision]["metrics"][name]["classification"]
        assert half.keys() == tasks["classification"].keys()
        n = tasks["classification"]["n_images"]
        assert abs(half["name_overall_acc"] - tasks["classification"]["name_overall_acc"]) <= 1 / n  # one image at most
    assert len(list(Path("store").glob("*.safetensors"))) == 4  # fp32's and the half run's embeddings: other keys


def test_decoding_workers_and_pinned_memory_give_the_same_metrics(rendered_project, monkeypatch):
    loaders = []  # (num_workers, pin_memory) of every DataLoader the evaluation builds
    loader = torch.utils.data.DataLoader

    def recording(*args, **kwargs):
        loaders.append((kwargs.get("num_workers"), kwargs.get("pin_memory")))
        return loader(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", recording)
    results = {}
    for workers, pin in ((0, False), (2, True)):
        write_params(rendered_project, evaluate={"workers": workers, "pin_memory": pin})
        results[workers] = run_evaluate(load_params("params.yaml"), "baseline", Path("models/baseline"),
                                        Path("data/eval"), Path("data/concepts"), Path(f"metrics/{workers}.json"), None)
    assert set(loaders) == {(0, False), (2, True)}  # the params reached the loaders
    assert results[2]["metrics"] == results[0]["metrics"]


def test_compiled_towers_agree_with_the_plain_path(load):
    """torch.compile of the towers (`invert.compile`, `evaluate.compile`) with aot_eager, the backend that
    traces what inductor traces (dynamo's graph capture, AOTAutograd's forward and backward graphs)
    without generating kernels: inductor's C++ takes a minute per graph on 2 cores. Measured with
    inductor on the test machine (2026-12-08): after 5 inversion steps the pixels within 7e-7 of eager."""
    cfg = InvertParams(steps=5, samples=2)
    pixels, sims = invert_text(load(), "a photo of a red circle", cfg, seed=0, progress=False)
    model = load()
    keys = list(model.module.state_dict())
    compiled_pixels, compiled_sims = invert_text(model, "a photo of a red circle",
                                                 dataclasses.replace(cfg, compile="aot_eager"), seed=0, progress=False)
    assert model.compiled_with == "aot_eager"
    assert {name for name, child in model.module.named_children() if child._compiled_call_impl is not None} == {
        "visual", "transformer"}  # the towers, not the lone embedding table or norm
    assert list(model.module.state_dict()) == keys  # a checkpoint saved after it loads in plain open_clip
    assert torch.allclose(compiled_pixels, pixels, atol=1e-6) and torch.allclose(compiled_sims, sims, atol=1e-6)
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model.encode_images(images), load().encode_images(images), atol=1e-6)


def test_evaluation_with_compiled_towers_gives_the_same_metrics(rendered_project):
    results = {}
    for backend in (None, "aot_eager"):
        write_params(rendered_project, evaluate={"compile": backend})
        results[backend] = run_evaluate(load_params("params.yaml"), "baseline", Path("models/baseline"),
                                        Path("data/eval"), Path("data/concepts"), Path(f"metrics/{backend}.json"),
                                        Path("store"))
    assert results["aot_eager"]["params"]["evaluate"]["compile"] == "aot_eager"
    assert results["aot_eager"]["metrics"] == results[None]["metrics"]
    assert len(list(Path("store").glob("*.safetensors"))) == 4  # each backend's embeddings under its own key


def test_an_unknown_compile_backend_is_a_params_error(tiny_project):
    write_params(tiny_project, invert={"compile": "turbo"})
    with pytest.raises(ParamsError, match=r"'invert.compile' is 'turbo'; use null \(no torch.compile\) or one of"):
        load_params(tiny_project / "params.yaml")


def test_an_unknown_precision_is_a_params_error(tiny_project):
    write_params(tiny_project, evaluate={"precision": "fp8"})
    with pytest.raises(ParamsError, match=r"evaluate.precision' must be one of \['fp32', 'bf16', 'fp16'\]"):
        load_params(tiny_project / "params.yaml")
