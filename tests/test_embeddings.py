"""What an evaluation embeds once (ktpipe/eval/embeddings.py): each class's prompts once per model
across every set that names the class, and a model's image embeddings of a set once per model and
images, kept in the store for its next evaluation (the baseline after new templates, in every
experiment that reruns it), with the metrics a recomputation gives."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import save_tiny_checkpoint, write_params
from ktpipe.eval import model_key, run_evaluate
from ktpipe.eval.embeddings import EmbeddingCache
from ktpipe.models import OpenClipModel
from ktpipe.params import load_params


@pytest.fixture
def calls(monkeypatch) -> dict[str, list]:
    """Every encode_texts call's texts and every encode_images call's batch size, of any open_clip model."""
    seen = {"texts": [], "images": []}
    encode_texts, encode_images = OpenClipModel.encode_texts, OpenClipModel.encode_images

    def count_texts(self, texts, *args, **kwargs):
        seen["texts"].append(tuple(texts))
        return encode_texts(self, texts, *args, **kwargs)

    def count_images(self, pixels, *args, **kwargs):
        seen["images"].append(len(pixels))
        return encode_images(self, pixels, *args, **kwargs)

    monkeypatch.setattr(OpenClipModel, "encode_texts", count_texts)
    monkeypatch.setattr(OpenClipModel, "encode_images", count_images)
    return seen


def evaluate(out: str, store: Path | None) -> dict:
    params = load_params("params.yaml")
    return run_evaluate(params, "baseline", Path("models/baseline"), Path("data/eval"), Path("data/concepts"),
                        Path(out), store)


def test_each_class_is_encoded_once_per_model_across_sets(rendered_project, calls):
    result = evaluate("metrics/eval/baseline.json", None)
    assert set(result["metrics"]) == {"val", "test"}  # two sets of the same classes
    assert calls["texts"] and len(calls["texts"]) == len(set(calls["texts"]))  # no prompts encoded twice

    model = OpenClipModel.load(load_params("params.yaml").model.name)
    prompts = sorted(set(calls["texts"]))
    cached = EmbeddingCache().class_embeddings(model, prompts)
    with torch.no_grad():  # the rows as each class's prompts give them in one batch
        plain = torch.stack([F.normalize(model.encode_texts(list(p)).mean(0), dim=-1) for p in prompts])
    assert torch.equal(cached, plain)


def test_a_model_evaluated_again_reads_its_image_embeddings_from_the_store(rendered_project, calls, capsys,
                                                                             tmp_path):
    store = tmp_path / "store"
    evaluate("metrics/first.json", store)
    n_images = sum(calls["images"])
    assert n_images > 0 and len(list(store.glob("*.safetensors"))) == 2  # one entry per set

    (rendered_project / "one.txt").write_text("a drawing of a {}.\n")  # new templates: the baseline evaluates again
    write_params(rendered_project, evaluate={"templates": "one.txt"})
    calls["images"].clear()
    again = evaluate("metrics/again.json", store)
    assert calls["images"] == []  # every image embedding came from the store
    assert f"embeddings of {n_images} images reused from {store}" in capsys.readouterr().err
    fresh = evaluate("metrics/fresh.json", None)
    assert sum(calls["images"]) == n_images
    assert again["metrics"] == fresh["metrics"]  # what a recomputation gives
    assert json.loads(Path("metrics/again.json").read_text())["metrics"] == fresh["metrics"]

    test_images = sorted(Path("data/eval/test").rglob("*.png"))
    image = test_images[0]
    pixels = np.array(Image.open(image))
    pixels[0, 0] = 255 - pixels[0, 0]  # one image's bytes change: its set is embedded again, the other is not
    Image.fromarray(pixels).save(image)
    calls["images"].clear()
    evaluate("metrics/changed.json", store)
    assert 0 < sum(calls["images"]) == len(test_images) < n_images


def test_the_store_key_is_the_models_weights(rendered_project, tmp_path):
    params = load_params("params.yaml")
    base = model_key(params, "baseline", Path("models/baseline"))
    one = model_key(params, "paper", save_tiny_checkpoint(tmp_path / "one", seed=1))
    assert model_key(params, "paper", save_tiny_checkpoint(tmp_path / "same", seed=1)) == one  # same weights
    assert len({base, one, model_key(params, "paper", save_tiny_checkpoint(tmp_path / "two", seed=2))}) == 3


def test_embeddings_from_the_store_score_bit_for_bit_as_computed_ones(rendered_project, tiny_checkpoint, tmp_path):
    """An entry comes back in a fresh allocation, as a computed tensor is: a matrix product over the
    file's buffer (8-byte aligned in safetensors, not 64 as torch allocates) rounded differently, and
    the demo CoCa's near-tied name scores flipped 18 of 550 predictions between a cold and a warm run."""
    params = load_params("params.yaml")
    model = OpenClipModel.load(f"local-dir:{tiny_checkpoint}")
    paths = tuple(str(p) for p in sorted(Path("data/eval/test").rglob("*.png")))
    computed = torch.randn(len(paths), 64)  # any tensor: what the store keeps is what comes back
    cache = EmbeddingCache(model_key(params, "baseline", Path("models/baseline")), tmp_path / "store")
    cache.image_embeddings(model, paths, 8, lambda: computed)
    stored = cache.image_embeddings(model, paths, 8, lambda: pytest.fail("recomputed"))
    assert torch.equal(stored, computed) and cache.reused_images == len(paths)
    assert stored.data_ptr() % 64 == 0  # torch's own allocation, as `computed` has
