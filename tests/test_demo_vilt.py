"""The demo cross-encoder: its vocabulary, its vision side started from the demo CLIP, its
pretraining (which learns), its checkpoint round trip and its pair scoring."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import DEMO_CONCEPTS_FILE
from ktpipe.concepts import load_concepts_file, world_concepts
from ktpipe.models import load_model
from ktpipe.models.base import ModelLoadError
from ktpipe.demo.vilt import build_demo_vilt, build_tokenizer, copy_clip_vision_tower
from ktpipe.params import ParamsError, PretrainParams
from ktpipe.demo.pretrain_cross import candidate_captions, cross_pretrain_step, define_known, pretrain_cross, world_words
from ktpipe.templates import load_templates
from ktpipe.demo.world import load_world

CFG = PretrainParams(steps=40, batch_size=16, lr=1e-3, warmup=5, weight_decay=0.01, candidates=4, mlm_weight=0.5,
                     name_objective=False)


@pytest.fixture(scope="module")
def world():
    return load_world(concepts=world_concepts(load_concepts_file(DEMO_CONCEPTS_FILE)))


@pytest.fixture(scope="module")
def templates():
    return load_templates("demo")


def test_vocabulary_spells_names_it_lacks_in_letters(world, templates):
    tokenizer = build_tokenizer(world_words(world, templates))
    assert tokenizer.tokenize("A lantern is a striped orange ring.") == [
        "a", "lantern", "is", "a", "striped", "orange", "ring", "."]
    # a novel name is no word of the vocabulary: its letters, as any made-up name's
    assert tokenizer.tokenize("a photo of a blicket.")[4:-1] == ["b", "##l", "##i", "##c", "##k", "##e", "##t"]
    assert "[UNK]" not in tokenizer.tokenize("A Zorbit-9 is there.")


def test_vision_side_starts_from_the_demo_clip(world, templates, clip_dir):
    """The patch embedding, position embeddings and blocks are the CLIP's: the first block maps the
    same tokens to the same outputs in both models."""
    from ktpipe.models import load_checkpoint
    from ktpipe.params import ModelParams

    clip = load_checkpoint(ModelParams(backend="open_clip", device="cpu"), clip_dir).module.visual
    vilt = build_demo_vilt(world_words(world, templates), clip_dir).module
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        patches = vilt.vilt.embeddings.patch_embeddings(pixels)
        assert torch.allclose(patches, clip.conv1(pixels), atol=1e-5)
        tokens = torch.randn(2, 17, 96)
        ours = vilt.vilt.encoder.layer[0](tokens)[0]
        theirs = clip.transformer.resblocks[0](tokens)
        assert torch.allclose(ours, theirs, atol=1e-4)
    assert torch.equal(vilt.vilt.embeddings.position_embeddings[0], clip.positional_embedding)
    fresh = build_demo_vilt(world_words(world, templates), None).module
    assert not torch.allclose(fresh.vilt.encoder.layer[0].attention.attention.query.weight,
                              vilt.vilt.encoder.layer[0].attention.attention.query.weight)


def test_a_clip_of_another_shape_or_none_is_refused(world, tmp_path):
    from ktpipe.models import OpenClipModel

    with pytest.raises(ModelLoadError, match="no demo CLIP checkpoint"):
        copy_clip_vision_tower(build_demo_vilt(set()).module, tmp_path / "missing")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32,
                                              "patch_size": 8},
              "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    OpenClipModel.from_config(config).save(tmp_path / "narrow")
    with pytest.raises(ModelLoadError, match="architectures differ"):
        copy_clip_vision_tower(build_demo_vilt(set()).module, tmp_path / "narrow")


def test_candidates_put_the_own_caption_first_and_swap_known_names():
    texts = ["a photo of a lantern.", "a render of a clover.", "a red circle.", "a blue star."]
    rng = np.random.default_rng(0)
    candidates = candidate_captions(texts, 2, ["lantern", "clover", "halo"], 3, rng)
    assert [c[0] for c in candidates] == texts
    assert candidates[0][1] in ("a photo of a clover.", "a photo of a halo.")
    assert candidates[1][1] in ("a render of a lantern.", "a render of a halo.")
    for own, row in zip(texts, candidates):
        assert len(row) == 3 and own not in row[1:]
    with pytest.raises(ParamsError, match="pretrain.candidates"):
        candidate_captions(["a red circle.", "a red circle."], 0, [], 2, rng)


def test_known_concepts_are_also_captioned_by_their_definition(world):
    texts = ["a photo of a lantern.", "a render of a clover.", "a red circle.", "a photo of a halo."]
    defined = define_known(texts, 3, world, 1.0, np.random.default_rng(0))
    # the first n_named captions name a known concept; the rest (described renders) stay as they are
    assert defined == ["A lantern is a solid orange hexagon.", "A clover is a solid green cross.", "a red circle.",
                       "a photo of a halo."]
    assert define_known(texts, 3, world, 0.0, np.random.default_rng(0)) == texts


def probe_rank_loss(model, world, templates) -> float:
    """The ranking loss (own caption among its candidates) on one fixed batch of unseen renders."""
    probe = dataclasses.replace(LEARN, batch_size=64, mlm_weight=0.0)
    with torch.no_grad():
        return cross_pretrain_step(model, world, templates, probe, np.random.default_rng(7), 32, None)["rank_loss"].item()


# From a random start (the pipeline starts from the demo CLIP's vision tower, which learns faster
# than a test can afford to set up): each image against its own caption and one other, which for
# a named render is its caption with another known name. Every step's renders are new.
LEARN = dataclasses.replace(CFG, steps=100, candidates=2, lr=2e-3)


def test_cross_pretraining_learns(world, templates):
    start = pretrain_cross(world, templates, dataclasses.replace(LEARN, steps=0), progress=False).model
    result = pretrain_cross(world, templates, LEARN, progress=False)
    log = result.log
    chance = np.log(LEARN.candidates)
    assert min(r["rank_loss"] for r in log) > 0 and min(r["mlm_loss"] for r in log) > 0
    assert np.mean([r["rank_loss"] for r in log[-10:]]) < chance - 0.08
    assert np.mean([r["mlm_loss"] for r in log[-10:]]) < np.mean([r["mlm_loss"] for r in log[:10]]) - 0.5
    before = dict(start.module.named_parameters())
    moved = {name: ((p - before[name]).norm() / before[name].norm()).item()
             for name, p in result.model.module.named_parameters() if p.ndim >= 2}
    # 100 steps of decay 0.01 at lr <= 2e-3 shrink a matrix by < 0.2%: every matrix moved beyond that
    assert min(moved.values()) > 0.01, min(moved, key=moved.get)
    assert probe_rank_loss(result.model, world, templates) < probe_rank_loss(start, world, templates) - 0.08


def test_pretrained_checkpoint_loads_through_the_backend(world, templates, tmp_path):
    result = pretrain_cross(world, templates, dataclasses.replace(CFG, steps=2), progress=False)
    result.model.save(tmp_path / "vilt")
    loaded = load_model("demo_vilt", "ktpipe-demo-vilt", str(tmp_path / "vilt"), "cpu")
    pixels = torch.rand(3, 3, 32, 32)
    texts = ["a photo of a lantern.", "A blicket is a striped orange ring.", "a red circle."]
    with torch.no_grad():
        assert torch.allclose(loaded.score_pairs(pixels, texts), result.model.score_pairs(pixels, texts), atol=1e-5)
        masked = loaded.word_masker(0)(texts)
        assert torch.allclose(loaded.masked_word_loss(pixels, masked), result.model.masked_word_loss(pixels, masked),
                              atol=1e-5)
    again = load_model("demo_vilt", f"local-dir:{tmp_path / 'vilt'}", None, "cpu")  # as a fine-tuned checkpoint
    assert again.tokenizer.tokenize("lantern") == ["lantern"]
    with pytest.raises(ModelLoadError, match="run its base_model stage"):
        load_model("demo_vilt", "ktpipe-demo-vilt", str(tmp_path / "none"), "cpu")


def test_every_pair_scores_as_one_pair_at_a_time(world, templates):
    """score_targets embeds each image once for all its pairs: the same logits as pair by pair."""
    model = build_demo_vilt(world_words(world, templates))
    pixels = torch.rand(5, 3, 32, 32)
    texts = ["a photo of a lantern.", "a photo of a blicket.", "an outlined blue circle on a gray background."]
    with torch.no_grad():
        grid = model.score_targets(pixels, model.text_targets(texts))
        one_by_one = torch.stack([model.score_pairs(pixels, [t] * len(pixels)) for t in texts], 1)
    assert torch.allclose(grid, one_by_one, atol=1e-5)


def test_scores_are_the_same_bytes_whatever_the_global_random_state(world, templates):
    """ViLT draws its patch order at random; the backend seeds that draw, so a rerun of a stage
    writes the same bytes (DVC then skips what follows), and leaves the global state alone."""
    model = build_demo_vilt(world_words(world, templates))
    pixels = torch.rand(4, 3, 32, 32)
    texts = ["a photo of a lantern.", "a red circle.", "a photo of a blicket.", "a blue star."]
    with torch.no_grad():
        torch.manual_seed(1)
        first = model.score_pairs(pixels, texts)
        torch.manual_seed(2)
        state = torch.random.get_rng_state()
        second = model.score_pairs(pixels, texts)
        assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first, second)
    # and its training on a multi-threaded CPU uses deterministic kernels (patch gathers accumulate)
    assert torch.are_deterministic_algorithms_enabled()
