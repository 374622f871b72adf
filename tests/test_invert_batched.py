"""Batched inversion (`invert.concepts_per_batch` > 1): several concepts in one batch of concepts x
samples images give each concept what its own run gives, within float rounding, because each keeps
its own seed, augmentations, loss share, gradient clip and Adam state; the stage keeps DVC's
granularity through the store, one batch at a time."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_stage_here, write_params
from ktpipe.models import OpenClipModel
from ktpipe.params import InvertParams
from ktpipe.images import initial_pixels
from ktpipe.transfer.invert import (batched_similarity, clip_per_concept, invert_text, invert_texts,
                                    stack_targets)
from test_invert_objective import TINY_CLIP

TEXTS = ["a striped orange ring", "an outlined pink triangle", "a solid green square"]
SEEDS = [11, 22, 33]
TOLERANCE = 1e-4  # max |pixel| difference from each concept's own run (pixels in [0, 1])


@pytest.fixture(scope="module")
def tiny_model() -> OpenClipModel:
    torch.manual_seed(0)
    return OpenClipModel.from_config(TINY_CLIP)


@pytest.mark.parametrize("cfg", [
    InvertParams(steps=6, samples=2, lr=0.1, affine_p=0.5, grad_clip=0.01),  # the clip acts on every step
    InvertParams(steps=6, samples=3, lr=0.1, reduction="mean", similarity="l2", padding="border",
                 progressive=True, progressive_sizes=(8,), progressive_steps=(3,)),
], ids=["sum-cosine-clipped", "mean-l2-progressive"])
def test_a_batch_gives_each_concept_its_own_run(tiny_model, cfg):
    pixels, sims = invert_texts(tiny_model, TEXTS, cfg, SEEDS, progress=False)
    assert pixels.shape == (3, cfg.samples, 3, tiny_model.image_size, tiny_model.image_size)
    for i, (text, seed) in enumerate(zip(TEXTS, SEEDS)):
        alone, alone_sims = invert_text(tiny_model, text, cfg, seed, progress=False)
        assert (pixels[i] - alone).abs().max() < TOLERANCE, text
        assert (sims[i] - alone_sims).abs().max() < TOLERANCE, text
    # the concepts really differ (seeds and texts), so the comparison above is not vacuous
    assert (pixels[0] - pixels[1]).abs().max() > 0.1
    # and it learns: each concept's images moved toward its own text from the starting noise
    start = torch.cat([initial_pixels(cfg.samples, tiny_model.image_size, torch.Generator().manual_seed(seed), cfg.init)
                       for seed in SEEDS])
    target = stack_targets([tiny_model.text_target(text, cfg.similarity) for text in TEXTS], cfg.samples)
    with torch.no_grad():
        before = batched_similarity(tiny_model, start, target, cfg.similarity).view(3, cfg.samples)
    assert (sims.mean(dim=1) > before.mean(dim=1)).all(), (before, sims)


def test_clipping_one_concept_leaves_the_others_alone():
    grad = torch.zeros(3 * 2, 3, 4, 4)
    grad[:2] = 10.0  # concept 0: norm far above the clip
    grad[2:4] = 1e-3  # concept 1: below it
    grad[4:] = 0.5  # concept 2: above it
    expected = torch.cat([g * min(1.0, 1.0 / (g.norm().item() + 1e-6)) for g in grad.split(2)])
    clip_per_concept(grad, 3, max_norm=1.0)
    assert torch.allclose(grad, expected)
    assert grad[:2].norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(grad[2:4], torch.full_like(grad[2:4], 1e-3))  # untouched: one global clip would shrink it


def test_targets_stack_one_per_image():
    embeddings = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    assert stack_targets(embeddings, 2).tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]
    tokens = [{"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[1, 1]])},
              {"input_ids": torch.tensor([[3, 0]]), "attention_mask": torch.tensor([[1, 0]])}]
    stacked = stack_targets(tokens, 3)
    assert stacked["input_ids"].tolist() == [[1, 2]] * 3 + [[3, 0]] * 3
    assert stacked["attention_mask"].shape == (6, 2)
    with pytest.raises(TypeError, match="concepts_per_batch: 1"):
        stack_targets(["a text"], 2)


def test_the_stage_batches_concepts_and_recomputes_only_an_edited_concepts_batch(tiny_project):
    names = ["blicket", "dax", "wug", "lantern"]
    write_params(tiny_project, concepts={"names": names}, invert={"steps": 3, "samples": 2, "concepts_per_batch": 2})
    result = run_stage_here(tiny_project, "captions", "captions/demo.yaml", "captions/generated.yaml",
                            "data/concepts", "data/world.json", "data/known.json")
    assert result.returncode == 0, result.stderr

    def invert(out: str) -> dict:
        result = run_stage_here(tiny_project, "invert", "data/concepts", out, "--timing", f"metrics/{out}.json")
        assert result.returncode == 0, result.stderr
        return {n: e["how"] for n, e in json.loads((tiny_project / f"metrics/{out}.json").read_text())["concepts"].items()}

    assert invert("first") == dict.fromkeys(names, "computed")
    summary = json.loads((tiny_project / "first/wug/summary.json").read_text())
    assert summary["batch"] == ["wug", "lantern"]  # concepts.names order, two at a time
    concept = tiny_project / "data/concepts/blicket.json"
    concept.write_text(json.dumps({**json.loads(concept.read_text()), "description": "a solid pink triangle"}))
    assert invert("edited") == {"blicket": "computed", "dax": "computed", "wug": "reused", "lantern": "reused"}
    for name in ("wug", "lantern"):
        assert ((tiny_project / f"edited/{name}/images.safetensors").read_bytes()
                == (tiny_project / f"first/{name}/images.safetensors").read_bytes())


def test_concepts_per_batch_must_be_positive(tiny_project):
    write_params(tiny_project, invert={"concepts_per_batch": 0})
    result = run_stage_here(tiny_project, "invert", "data/concepts", "data/inverted")
    assert result.returncode == 2 and "invert.concepts_per_batch" in result.stderr
    assert not (tiny_project / "data/inverted").exists()


def test_the_batching_benchmark_prints_both_modes(capsys):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("invert_batched", REPO / "benchmarks/invert_batched.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--concepts", "2", "--samples", "2", "--steps", "2"])
    out = capsys.readouterr().out
    assert "one concept at a time" in out and "all concepts batched" in out and "speed-up" in out
    difference = float(out.rsplit("largest pixel difference ", 1)[1].split()[0])
    assert difference < TOLERANCE
