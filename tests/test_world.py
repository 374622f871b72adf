"""Tests for the procedural image world: loading, sampling, rendering, captions, splits."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ktpipe.world as world_module
from conftest import DEMO_CAPTIONS
from ktpipe.captions import load_captions, world_concepts
from ktpipe.world import (
    Attributes,
    World,
    concept_attributes,
    describe,
    load_world,
    render,
    render_batch,
    sample_attributes,
    write_split,
)

GOOD_YAML = """\
shapes: [circle, square]
colors: {red: [220, 40, 40], blue: [50, 90, 230]}
fills: [solid, outlined]
backgrounds: {black: [15, 15, 15]}
concepts:
  dot: {shape: circle, color: red, fill: solid, role: known}
  box: {shape: square, color: blue, fill: outlined, role: novel}
"""


@pytest.fixture(scope="module")
def world() -> World:
    """The packaged vocabularies with the demo captions file's concepts, as the pipeline builds it."""
    return load_world(concepts=world_concepts(load_captions(DEMO_CAPTIONS)))


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "world.yaml"
    path.write_text(text)
    return path


def count_shape_pixels(image: np.ndarray, fg: tuple, bg: tuple) -> np.ndarray:
    """Pixels closer to the shape color than to the background color, (H, W) bool."""
    pixels = image.astype(float)
    return np.linalg.norm(pixels - fg, axis=-1) < np.linalg.norm(pixels - bg, axis=-1)


def test_load_world_reads_package_file(world):
    assert len(world.shapes) == 9 and len(world.fills) == 3
    assert world.colors["orange"] == (250, 140, 30)
    assert {c.name for c in world.novel()} == {"blicket", "dax", "wug"}
    assert len(world.known()) == 8
    halo = world.concepts["halo"]
    assert halo.matches(Attributes("ring", "yellow", "outlined", "gray"))
    assert not halo.matches(Attributes("ring", "yellow", "solid", "gray"))


def test_load_world_reads_a_given_path(tmp_path):
    world = load_world(write_yaml(tmp_path, GOOD_YAML))
    assert world.shapes == ("circle", "square")
    assert [c.name for c in world.novel()] == ["box"]


@pytest.mark.parametrize(
    "old, new, words",
    [
        ("color: red, fill: solid", "color: teal, fill: solid", ["dot", "color", "teal"]),
        ("role: novel", "role: secret", ["box", "role", "secret"]),
        ("shape: square, color: blue", "shape: blob, color: blue", ["box", "shape", "blob"]),
        ("fill: outlined, role", "fill: striped, role", ["box", "fill", "striped"]),
        ("square, color: blue, fill: outlined", "circle, color: red, fill: solid", ["box", "dot"]),
        ("shapes: [circle, square]", "shapes: [circle, blob]", ["blob", "circle", "crescent"]),
        ("role: known}", "role: known, size: 3}", ["dot", "size"]),
    ],
)
def test_load_world_rejects_bad_yaml(tmp_path, old, new, words):
    assert old in GOOD_YAML
    path = write_yaml(tmp_path, GOOD_YAML.replace(old, new, 1))
    with pytest.raises(ValueError) as info:
        load_world(path)
    for word in words:
        assert word in str(info.value)


def test_render_is_deterministic_uint8(world):
    a = Attributes("star", "cyan", "striped", "brown")
    first = render(a, world, np.random.default_rng(7))
    again = render(a, world, np.random.default_rng(7))
    other = render(a, world, np.random.default_rng(8))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert render(a, world, np.random.default_rng(7), size=48).shape == (48, 48, 3)


def test_different_shapes_give_different_masks(world):
    fg, bg = world.colors["red"], world.backgrounds["black"]
    masks = {
        shape: count_shape_pixels(
            render(Attributes(shape, "red", "solid", "black"), world, np.random.default_rng(3)),
            fg,
            bg,
        )
        for shape in world.shapes
    }
    for mask in masks.values():
        assert 60 < mask.sum() < 32 * 32 * 0.75  # visible and inside the frame
    for (s1, m1), (s2, m2) in itertools.combinations(masks.items(), 2):
        assert (m1 ^ m2).sum() >= 15, f"{s1} and {s2} look alike"


@pytest.mark.parametrize("shape", ["circle", "square", "star", "ring", "crescent"])
def test_outlined_and_striped_paint_less_than_solid(world, shape):
    fg, bg = world.colors["blue"], world.backgrounds["white"]
    painted = {
        fill: count_shape_pixels(
            render(Attributes(shape, "blue", fill, "white"), world, np.random.default_rng(5)),
            fg,
            bg,
        ).sum()
        for fill in world.fills
    }
    assert painted["outlined"] < 0.85 * painted["solid"]
    assert painted["striped"] < 0.85 * painted["solid"]


def test_render_batch_shape_and_range(world):
    attrs = sample_attributes(world, np.random.default_rng(0), 6)
    batch = render_batch(attrs, world, np.random.default_rng(0))
    assert batch.shape == (6, 3, 32, 32) and batch.dtype == torch.float32
    assert 0.0 <= batch.min() and batch.max() <= 1.0
    first = torch.from_numpy(render(attrs[0], world, np.random.default_rng(0))).float() / 255
    assert torch.equal(batch[0], first.permute(2, 0, 1))


def test_sample_attributes_excludes_novel_but_covers_values(world):
    attrs = sample_attributes(world, np.random.default_rng(0), 5000)
    assert not any(c.matches(a) for a in attrs for c in world.novel())
    assert {a.shape for a in attrs} == set(world.shapes)
    assert {a.color for a in attrs} == set(world.colors)
    assert {a.fill for a in attrs} == set(world.fills)
    assert {a.background for a in attrs} == set(world.backgrounds)
    assert any(c.matches(a) for a in attrs for c in world.known())


def test_sample_attributes_can_include_novel(world):
    attrs = sample_attributes(world, np.random.default_rng(0), 5000, exclude_novel=False)
    assert any(c.matches(a) for a in attrs for c in world.novel())


def test_concept_attributes_keep_the_combo(world):
    dax = world.concepts["dax"]
    attrs = concept_attributes(dax, world, np.random.default_rng(0), 40)
    assert len(attrs) == 40 and all(dax.matches(a) for a in attrs)
    assert {a.background for a in attrs} == set(world.backgrounds)


def test_describe_articles_and_background():
    ring = Attributes("ring", "orange", "striped", "black")
    assert describe(ring) == "a striped orange ring on a black background."
    assert describe(ring, with_background=False) == "a striped orange ring."
    outlined = Attributes("circle", "red", "outlined", "gray")
    assert describe(outlined) == "an outlined red circle on a gray background."


def test_write_split_counts_and_pngs(world, tmp_path):
    out = tmp_path / "eval" / "novel_split"
    counts = write_split(world, out, n_per_concept=2, seed=0)
    assert counts == {name: 2 for name in world.concepts}
    assert sorted(p.name for p in out.iterdir()) == sorted(world.concepts)
    for name in world.concepts:
        files = sorted((out / name).iterdir())
        assert [f.name for f in files] == ["0000.png", "0001.png"]
        with Image.open(files[0]) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    assert sorted(p.name for p in out.parent.iterdir()) == ["novel_split"]  # no temp left


def test_write_split_is_deterministic_and_replaces(world, tmp_path):
    out = tmp_path / "split"
    write_split(world, out, n_per_concept=1, seed=3)
    (out / "stale.txt").write_text("old")
    write_split(world, out, n_per_concept=1, seed=3)
    assert not (out / "stale.txt").exists()
    first = np.asarray(Image.open(out / "wug" / "0000.png"))
    write_split(world, tmp_path / "again", n_per_concept=1, seed=3)
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "again" / "wug" / "0000.png")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "split"]


def test_write_split_rejects_zero_and_leaves_nothing(world, tmp_path):
    out = tmp_path / "split"
    with pytest.raises(ValueError, match="n_per_concept"):
        write_split(world, out, n_per_concept=0, seed=0)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_write_split_failure_leaves_nothing(world, tmp_path, monkeypatch):
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return np.zeros((32, 32, 3), dtype=np.uint8)

    monkeypatch.setattr(world_module, "render", failing_render)
    with pytest.raises(RuntimeError, match="disk full"):
        write_split(world, tmp_path / "split", n_per_concept=2, seed=0)
    assert list(tmp_path.iterdir()) == []
