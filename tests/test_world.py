"""Tests for the procedural image world: loading, sampling, rendering, descriptions, splits."""

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ktpipe.demo.world as world_module
from conftest import DEMO_CONCEPTS_FILE
from ktpipe.concepts import load_concepts_file, world_concepts
from ktpipe.demo.world import (
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
    """The packaged vocabularies with the demo concepts file's concepts, as the pipeline builds it."""
    return load_world(concepts=world_concepts(load_concepts_file(DEMO_CONCEPTS_FILE)))


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


def test_render_batch_equals_renders_one_by_one(world):
    attrs = sample_attributes(world, np.random.default_rng(0), 60, exclude_novel=False)
    batch_rng, single_rng = np.random.default_rng(3), np.random.default_rng(3)
    batch = render_batch(attrs, world, batch_rng)
    singles = np.stack([render(a, world, single_rng) for a in attrs])
    assert torch.equal(batch, torch.from_numpy(singles).permute(0, 3, 1, 2).float() / 255)
    assert batch_rng.random() == single_rng.random()  # the same draws, in the same order


def plain_coverage(shape: str, fill: str, pose, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Coverage as plain supersampling computes it, every supersample in the sdfs' own
    arithmetic; and the supersamples' sdf."""
    gx, gy = world_module.build_grid(size)
    dx, dy = gx - pose.center[0], gy - pose.center[1]
    cos, sin = np.cos(pose.angle), np.sin(pose.angle)
    local_x, local_y = (cos * dx + sin * dy) / pose.radius, (-sin * dx + cos * dy) / pose.radius
    sdf = world_module.SHAPES[shape].sdf(local_x, local_y) * pose.radius
    u = gx * np.cos(pose.stripe_angle) + gy * np.sin(pose.stripe_angle)
    stripes = np.mod(u / pose.stripe_period + pose.stripe_phase, 1.0) < 0.5
    painted = {
        "solid": sdf < 0,
        "outlined": (sdf < 0) & (sdf > -pose.border),
        "striped": (sdf < 0) & (stripes | (sdf > -pose.border / 2.5)),
    }[fill]
    s = world_module.SUPERSAMPLE
    return painted.reshape(size, s, size, s).mean(axis=(1, 3), dtype=np.float32), sdf


@pytest.mark.parametrize("size", [16, 32, 64])
def test_coverage_equals_plain_supersampling(size):
    rng = np.random.default_rng(size)
    for shape, fill in itertools.product(world_module.SHAPES, world_module.FILLS):
        for _ in range(8):
            pose = world_module.sample_pose(shape, rng, size)
            expected, _ = plain_coverage(shape, fill, pose, size)
            assert np.array_equal(world_module.compute_coverage(shape, fill, pose, size), expected), (shape, fill)


@pytest.mark.parametrize("shape", list(world_module.SHAPES))
def test_coverage_equals_plain_supersampling_with_thresholds_on_supersamples(shape):
    """Borders and stripe edges put exactly on supersamples, where float32 cannot decide."""
    rng = np.random.default_rng(0)
    for _ in range(4):
        pose = world_module.sample_pose(shape, rng, 32)
        _, sdf = plain_coverage(shape, "solid", pose, 32)
        for value in rng.choice(sdf[sdf < 0], 4):
            for fill, border in (("outlined", -float(value)), ("striped", -2.5 * float(value))):
                posed = dataclasses.replace(pose, border=border)
                expected, _ = plain_coverage(shape, fill, posed, 32)
                assert np.array_equal(world_module.compute_coverage(shape, fill, posed, 32), expected), (shape, fill)
        gx, gy = world_module.build_grid(32)
        for i in rng.choice(gx.size, 4):  # stripe phase 1/2 or 0 at supersample i
            u = gx.flat[i] * np.cos(pose.stripe_angle) + gy.flat[i] * np.sin(pose.stripe_angle)
            for edge in (0.5, 1.0):
                posed = dataclasses.replace(pose, stripe_phase=float(np.mod(edge - u / pose.stripe_period, 1.0)))
                expected, _ = plain_coverage(shape, "striped", posed, 32)
                assert np.array_equal(world_module.compute_coverage(shape, "striped", posed, 32), expected), shape


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
    shown = write_split(world, out, n_per_concept=2, seed=0)
    assert {name: len(attrs) for name, attrs in shown.items()} == {name: 2 for name in world.concepts}
    assert all(world.concepts[name].matches(a) for name, attrs in shown.items() for a in attrs)
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

    def failing_render(attrs, *args, **kwargs):  # the second concept's renders fail
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("disk full")
        return np.zeros((len(attrs), 32, 32, 3), dtype=np.uint8), None

    monkeypatch.setattr(world_module, "render_scenes", failing_render)
    with pytest.raises(RuntimeError, match="disk full"):
        write_split(world, tmp_path / "split", n_per_concept=2, seed=0)
    assert list(tmp_path.iterdir()) == []
