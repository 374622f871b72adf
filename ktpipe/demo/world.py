"""A procedural image world: small renders of a shape with a color, a fill and a background.

The world (attribute values and named concepts) is data, read from YAML. It streams captioned
pretraining batches for a tiny CLIP model and writes held-out evaluation folders. Novel
concepts' combinations never reach pretraining, so later stages can teach them by text alone.
"""

import dataclasses
import functools
import itertools
import json
import re
import zlib
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from ruamel.yaml import YAML

from ktpipe.errors import InputMissingError, KtpipeError
from ktpipe.io import atomic_dir

ROLES = ("known", "novel")


class WorldError(KtpipeError):
    """A demo-world file or concept table is malformed, or asks for what the renderer cannot draw."""

FILLS = ("solid", "outlined", "striped")
SUPERSAMPLE = 4  # render on a 4x finer grid, then box-downsample for anti-aliasing
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")  # concept names become folder names


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What one image shows; the background is independent of the concept."""

    shape: str
    color: str
    fill: str
    background: str


@dataclasses.dataclass(frozen=True)
class Concept:
    """A named (shape, color, fill) combination; `role` says whether pretraining sees it."""

    name: str
    shape: str
    color: str
    fill: str
    role: str  # "known" | "novel"

    def matches(self, a: Attributes) -> bool:
        """True when `a` shows this concept, whatever its background."""
        return (a.shape, a.color, a.fill) == (self.shape, self.color, self.fill)


@dataclasses.dataclass(frozen=True)
class World:
    """Attribute vocabularies, RGB values and named concepts of one world."""

    shapes: tuple[str, ...]
    colors: dict[str, tuple[int, int, int]]  # name -> RGB in 0..255
    fills: tuple[str, ...]
    backgrounds: dict[str, tuple[int, int, int]]  # name -> RGB in 0..255
    concepts: dict[str, Concept]  # name -> concept, in file order
    held_out: frozenset[tuple[str, str, str]] = frozenset()  # (shape, color, fill) combinations pretraining
    # never shows, whatever concepts a user later adds: every novel concept takes one of them

    def novel(self) -> list[Concept]:
        """Concepts whose combinations pretraining never shows."""
        return [c for c in self.concepts.values() if c.role == "novel"]

    def known(self) -> list[Concept]:
        """Concepts that pretraining may show."""
        return [c for c in self.concepts.values() if c.role == "known"]


# --- shapes -------------------------------------------------------------------------------
# A shape is a signed distance function on local coordinates (unit = shape radius,
# y pointing down): negative inside. Its mask is `sdf < 0`; the eroded mask used for
# outlines is `sdf < -width`, an exact Euclidean erosion.

ShapeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """How to draw one shape and how far it may rotate while staying recognisable."""

    sdf: ShapeFn
    max_rotation_deg: float  # rotation is uniform in +-this; square vs diamond needs it small


def build_polygon_sdf(vertices: list[tuple[float, float]]) -> ShapeFn:
    """Signed distance to a simple (possibly non-convex) polygon; sign from an even-odd test.

    All edges are handled at once (edges along rows, points along columns), so a call costs the
    same few numpy operations whatever the number of edges.
    """
    a = np.asarray(vertices, dtype=np.float32)
    x0, y0 = a[:, :1], a[:, 1:]  # (E, 1) edge starts
    b = np.roll(a, -1, axis=0)
    y1 = b[:, 1:]  # (E, 1) edge ends
    ex, ey = b[:, :1] - x0, y1 - y0  # (E, 1) edge vectors
    length2 = ex * ex + ey * ey
    ey_or_1 = np.where(ey != 0, ey, np.float32(1))  # a horizontal edge never crosses a horizontal ray

    def sdf(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        px, py = x.reshape(1, -1), y.reshape(1, -1)
        dx, dy = px - x0, py - y0  # (E, N)
        crosses = (y0 > py) != (y1 > py)
        inside = np.logical_xor.reduce(crosses & (px < x0 + ex * dy / ey_or_1), axis=0)
        t = np.clip((dx * ex + dy * ey) / length2, 0.0, 1.0)
        dist2 = np.min((dx - t * ex) ** 2 + (dy - t * ey) ** 2, axis=0).astype(np.float32)
        dist = np.sqrt(dist2)
        return np.where(inside, -dist, dist).reshape(x.shape)

    return sdf


def build_regular_vertices(n: int, radii: tuple[float, ...], start_deg: float) -> list:
    """Vertices at equal angles, cycling through `radii` (two radii give a star)."""
    angles = np.deg2rad(start_deg + 360.0 / n * np.arange(n))
    r = np.resize(np.asarray(radii), n)
    return list(zip(r * np.cos(angles), r * np.sin(angles)))


def build_cross_vertices(half_width: float) -> list[tuple[float, float]]:
    """The 12 corners of a plus sign with arms of length 1."""
    h = half_width
    quarter = [(-h, -1.0), (h, -1.0), (h, -h)]
    corners = []
    for _ in range(4):  # each arm's three corners are the previous ones turned 90 degrees
        corners += quarter
        quarter = [(-y, x) for x, y in quarter]
    return corners


def sdf_circle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Unit disc."""
    return np.hypot(x, y) - 1.0


def sdf_ring(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Annulus between radius 0.4 and 1: wide enough that an outlined ring keeps a gap."""
    r = np.hypot(x, y)
    return np.maximum(r - 1.0, 0.4 - r)


def sdf_crescent(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Unit disc minus a disc of radius 0.85 shifted right by 0.5."""
    return np.maximum(np.hypot(x, y) - 1.0, 0.85 - np.hypot(x - 0.5, y))


SQUARE = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
TRIANGLE = [(0.0, -0.95), (1.0, 0.75), (-1.0, 0.75)]  # pointing up, centered on its box
DIAMOND = [(0.0, -1.0), (0.8, 0.0), (0.0, 1.0), (-0.8, 0.0)]  # taller than wide
SHAPES: dict[str, ShapeSpec] = {
    "circle": ShapeSpec(sdf_circle, 0.0),
    "square": ShapeSpec(build_polygon_sdf(SQUARE), 12.0),
    "triangle": ShapeSpec(build_polygon_sdf(TRIANGLE), 20.0),
    "diamond": ShapeSpec(build_polygon_sdf(DIAMOND), 12.0),
    "star": ShapeSpec(build_polygon_sdf(build_regular_vertices(10, (1.0, 0.48), -90.0)), 36.0),
    "cross": ShapeSpec(build_polygon_sdf(build_cross_vertices(0.34)), 12.0),
    "ring": ShapeSpec(sdf_ring, 0.0),
    "hexagon": ShapeSpec(build_polygon_sdf(build_regular_vertices(6, (1.0,), 0.0)), 30.0),
    "crescent": ShapeSpec(sdf_crescent, 45.0),
}


# --- loading ------------------------------------------------------------------------------


def load_world(path: str | Path | None = None, concepts: dict | None = None) -> World:
    """Read and validate a world YAML (default: the packaged demo world's vocabularies).

    The named concepts come from `concepts` (name -> {shape, color, fill, role}; the pipeline
    passes the `render` entries of the concepts file) or else from the YAML's optional
    `concepts` mapping; a world without concepts renders nothing named.
    """
    source = Path(path) if path is not None else files("ktpipe.demo") / "world.yaml"
    raw = YAML(typ="safe").load(source.read_text())
    if not isinstance(raw, dict):
        raise WorldError(f"{source}: expected a mapping at the top level")
    check_keys({k: v for k, v in raw.items() if k not in ("concepts", "held_out")},
               {"shapes", "colors", "fills", "backgrounds"}, "world")
    world = World(
        shapes=parse_names(raw["shapes"], "shapes", known=tuple(SHAPES)),
        colors=parse_palette(raw["colors"], "colors"),
        fills=parse_names(raw["fills"], "fills", known=FILLS),
        backgrounds=parse_palette(raw["backgrounds"], "backgrounds"),
        concepts={},
    )
    if "held_out" in raw:  # without it, pretraining holds out the novel concepts it is given
        world = dataclasses.replace(world, held_out=parse_held_out(raw["held_out"], world))
    named = concepts if concepts is not None else raw.get("concepts") or {}
    return dataclasses.replace(world, concepts=parse_concepts(named, world) if named else {})


def load_demo_world(concepts_path: str | Path) -> World:
    """The packaged demo world with the concepts of a JSON file (name -> {shape, color, fill,
    role}), as the concepts stage writes it from the concepts file's `render` entries."""
    path = Path(concepts_path)
    if not path.is_file():
        raise InputMissingError(f"demo world concepts not found at {path}; run the concepts stage first")
    return load_world(concepts=json.loads(path.read_text()))


def check_keys(raw: dict, expected: set[str], where: str) -> None:
    """Reject missing or unknown keys so typos fail loudly."""
    missing, unknown = sorted(expected - set(raw)), sorted(set(raw) - expected)
    if missing or unknown:
        raise WorldError(f"{where}: missing keys {missing}, unknown keys {unknown}")


def parse_names(raw: object, field: str, known: tuple[str, ...]) -> tuple[str, ...]:
    """A non-empty list of distinct names, each one the renderer supports."""
    if not isinstance(raw, list) or not raw or not all(isinstance(v, str) for v in raw):
        raise WorldError(f"{field}: expected a non-empty list of names, got {raw!r}")
    if len(set(raw)) != len(raw):
        raise WorldError(f"{field}: duplicate names in {raw}")
    unsupported = [v for v in raw if v not in known]
    if unsupported:
        raise WorldError(f"{field}: cannot render {unsupported}; known {field}: {list(known)}")
    return tuple(raw)


def parse_palette(raw: object, field: str) -> dict[str, tuple[int, int, int]]:
    """A non-empty mapping of name -> [r, g, b] with integer channels in 0..255."""
    if not isinstance(raw, dict) or not raw:
        raise WorldError(f"{field}: expected a non-empty mapping of name -> [r, g, b]")
    for name, rgb in raw.items():
        ok = isinstance(rgb, list) and len(rgb) == 3
        if not ok or not all(type(c) is int and 0 <= c <= 255 for c in rgb):
            raise WorldError(f"{field}.{name}: expected [r, g, b] ints in 0..255, got {rgb!r}")
    return {str(name): tuple(rgb) for name, rgb in raw.items()}


def parse_held_out(raw: object, world: World) -> frozenset[tuple[str, str, str]]:
    """The combinations pretraining never draws: a list of [shape, color, fill] the world defines."""
    if not isinstance(raw, list) or not raw:
        raise WorldError(f"held_out: expected a non-empty list of [shape, color, fill], got {raw!r}")
    combos = set()
    for entry in raw:
        if not (isinstance(entry, list) and len(entry) == 3 and entry[0] in world.shapes and entry[1] in world.colors
                and entry[2] in world.fills):
            raise WorldError(f"held_out: {entry!r} is not a [shape, color, fill] of this world")
        combos.add(tuple(entry))
    return frozenset(combos)


def check_held_out(concept: Concept, world: World) -> None:
    """A novel concept takes a held-out combination (pretraining never showed it, whichever concepts
    exist); a known one takes any other, so the base model never depends on the novel concepts."""
    combo = (concept.shape, concept.color, concept.fill)
    if not world.held_out:
        return
    if concept.role == "novel" and combo not in world.held_out:
        free = sorted(" ".join(c) for c in world.held_out)
        raise WorldError(f"novel concept '{concept.name}': {' '.join(combo)} is shown in pretraining; a novel concept "
                         f"renders one of the world's held-out combinations (ktpipe/demo/world.yaml `held_out`): "
                         f"{', '.join(free)}")
    if concept.role == "known" and combo in world.held_out:
        raise WorldError(f"known concept '{concept.name}': {' '.join(combo)} is held out of pretraining for novel "
                         f"concepts; give it another combination or make it novel")


def parse_concepts(raw: object, world: World) -> dict[str, Concept]:
    """All concepts, each (shape, color, fill) combination used by at most one of them, novel ones
    on held-out combinations."""
    if not isinstance(raw, dict) or not raw:
        raise WorldError("concepts: expected a non-empty mapping of name -> attributes")
    concepts: dict[str, Concept] = {}
    owner: dict[tuple[str, str, str], str] = {}
    for name, fields in raw.items():
        concept = parse_concept(name, fields, world)
        combo = (concept.shape, concept.color, concept.fill)
        if combo in owner:
            other = owner[combo]
            raise WorldError(f"concept '{name}': combination {combo} already used by '{other}'")
        check_held_out(concept, world)
        owner[combo] = name
        concepts[name] = concept
    return concepts


def parse_concept(name: object, fields: object, world: World) -> Concept:
    """One concept whose every field takes a value the world defines."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise WorldError(f"concept {name!r}: name must match {_NAME_RE.pattern}")
    if not isinstance(fields, dict):
        raise WorldError(f"concept '{name}': expected a mapping, got {fields!r}")
    vocab = {"shape": world.shapes, "color": tuple(world.colors), "fill": world.fills}
    vocab["role"] = ROLES
    check_keys(fields, set(vocab), f"concept '{name}'")
    for field, allowed in vocab.items():
        if fields[field] not in allowed:
            value, allowed = fields[field], list(allowed)
            raise WorldError(f"concept '{name}': unknown {field} {value!r}; allowed: {allowed}")
    return Concept(name=name, **fields)


# --- sampling -----------------------------------------------------------------------------


def sample_attributes(
    world: World, rng: np.random.Generator, n: int, *, exclude_novel: bool = True
) -> list[Attributes]:
    """Uniform draws over all attribute combinations, optionally never a held-out one (where every
    novel concept lies)."""
    novel = set(world.held_out) | {(c.shape, c.color, c.fill) for c in world.novel()} if exclude_novel else set()
    every = itertools.product(world.shapes, world.colors, world.fills)
    combos = [combo for combo in every if combo not in novel]
    backgrounds = list(world.backgrounds)
    picks = rng.integers(len(combos), size=n)
    bgs = rng.integers(len(backgrounds), size=n)
    return [Attributes(*combos[i], backgrounds[b]) for i, b in zip(picks, bgs)]


def concept_attributes(
    concept: Concept, world: World, rng: np.random.Generator, n: int
) -> list[Attributes]:
    """`n` instances of one concept on uniformly random backgrounds."""
    backgrounds = list(world.backgrounds)
    bgs = rng.integers(len(backgrounds), size=n)
    return [Attributes(concept.shape, concept.color, concept.fill, backgrounds[b]) for b in bgs]


# --- rendering ----------------------------------------------------------------------------


STRIPE_ANGLES = (90.0, 45.0, 135.0)  # degrees: horizontal or diagonal stripes


@dataclasses.dataclass(frozen=True)
class Pose:
    """Random nuisance variables of one render, in output-pixel units."""

    radius: float
    center: np.ndarray  # (2,) x, y
    angle: float  # radians
    border: float  # outline width
    stripe_period: float
    stripe_angle: float  # radians, direction across the stripes
    stripe_phase: float  # fraction of a period
    color_jitter: np.ndarray  # (2, 3) shape, background


def sample_pose(shape: str, rng: np.random.Generator, size: int) -> Pose:
    """Draw every random choice of one render; always the same draws, whatever the fill."""
    px = size / 32.0  # lengths are tuned at 32 px and scale with the image
    max_rot = np.deg2rad(SHAPES[shape].max_rotation_deg)
    return Pose(
        radius=rng.uniform(0.30, 0.44) * size,
        center=size / 2.0 + rng.uniform(-2.0, 2.0, size=2) * px,
        angle=rng.uniform(-1.0, 1.0) * max_rot,
        border=rng.uniform(2.0, 2.75) * px,
        stripe_period=rng.uniform(4.0, 6.0) * px,
        stripe_angle=np.deg2rad(STRIPE_ANGLES[rng.integers(len(STRIPE_ANGLES))]),  # as rng.choice, faster
        stripe_phase=rng.uniform(),
        color_jitter=rng.integers(-10, 11, size=(2, 3)),
    )


@functools.cache
def build_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-center coordinates in output-pixel units, each (S*size, S*size)."""
    axis = (np.arange(size * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    gx, gy = np.meshgrid(axis, axis)  # x varies along columns, y along rows
    gx.flags.writeable = gy.flags.writeable = False  # shared by every render of this size
    return gx, gy


@functools.cache
def build_pixel_samples(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The supersample grid grouped by output pixel: x and y, each (size*size, S*S), pixels in
    row-major order."""
    grouped = []
    for g in build_grid(size):
        blocks = g.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).swapaxes(1, 2)
        grouped.append(blocks.reshape(size * size, SUPERSAMPLE * SUPERSAMPLE))
        grouped[-1].flags.writeable = False
    return grouped[0], grouped[1]


@functools.cache
def build_pixel_centers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Output-pixel centers: x and y, each (size, size)."""
    axis = np.arange(size, dtype=np.float32) + 0.5
    cx, cy = np.meshgrid(axis, axis)
    cx.flags.writeable = cy.flags.writeable = False
    return cx, cy


# Coverage is decided by comparisons only (sdf against 0 and the border, stripe phase against
# 1/2). A pixel whose decision cannot change within SAMPLE_REACH of its center is painted whole
# or not at all, as its supersamples would be; the others (the shape's edges) are supersampled.
# Both passes compute in fast float32 and redo what lies too near a threshold to trust in the
# arithmetic of plain supersampling (float64, float32 where an sdf rounds), so every render is
# bit-identical to a plain supersampled one.
# float32 errors measured at 32 to 256 px: sdf below 1e-6 radii, stripe phase below 3e-6 periods;
# the margins leave over ten times that. The sdfs change by at most a pixel per pixel moved.
SAMPLE_REACH = np.sqrt(2) * (SUPERSAMPLE - 1) / (2 * SUPERSAMPLE)  # farthest supersample from its pixel's center
SDF_MARGIN = 1e-5  # radii
PHASE_MARGIN = 1e-4  # stripe periods


@dataclasses.dataclass(frozen=True)
class Poses:
    """The poses of several renders as float64 columns (K, 1), so that numpy paints them in one
    pass; `take` gives one row per point (the supersampled pixels of many renders at once)."""

    radius: np.ndarray
    center_x: np.ndarray
    center_y: np.ndarray
    cos: np.ndarray  # of the rotation angle
    sin: np.ndarray
    border: np.ndarray
    stripe_period: np.ndarray
    stripe_cos: np.ndarray  # of the direction across the stripes
    stripe_sin: np.ndarray
    stripe_phase: np.ndarray

    @classmethod
    def stack(cls, poses: list[Pose]) -> "Poses":
        """Columns of the poses' values; cosines and sines are taken one pose at a time, as numpy's
        array kernels may round them differently from its scalar ones."""
        def column(values: list[float]) -> np.ndarray:
            return np.asarray(values, dtype=np.float64).reshape(-1, 1)

        return cls(column([p.radius for p in poses]), column([p.center[0] for p in poses]),
                   column([p.center[1] for p in poses]), column([np.cos(p.angle) for p in poses]),
                   column([np.sin(p.angle) for p in poses]), column([p.border for p in poses]),
                   column([p.stripe_period for p in poses]), column([np.cos(p.stripe_angle) for p in poses]),
                   column([np.sin(p.stripe_angle) for p in poses]), column([p.stripe_phase for p in poses]))

    def take(self, rows: np.ndarray) -> "Poses":
        return Poses(*(getattr(self, field.name)[rows] for field in dataclasses.fields(self)))


def compute_coverage(shape: str, fill: str, pose: Pose, size: int) -> np.ndarray:
    """Fraction of each output pixel painted in the shape color, (size, size) float32."""
    return compute_coverages(shape, fill, Poses.stack([pose]), size)[0]


def compute_coverages(shape: str, fill: str, poses: Poses, size: int) -> np.ndarray:
    """`compute_coverage` of K renders of one shape and fill at once, (K, size, size) float32;
    each equals its own render's coverage bit for bit."""
    cx, cy = (c.reshape(1, -1) for c in build_pixel_centers(size))  # (1, size*size)
    whole, mixed = paint(shape, fill, poses, cx, cy, np.float32, reach=SAMPLE_REACH)  # (K, size*size)
    coverage = whole.astype(np.float32)
    rows, pixels = np.nonzero(mixed)
    coverage[rows, pixels] = sample_coverage(shape, fill, poses.take(rows), size, pixels)
    return coverage.reshape(-1, size, size)


def sample_coverage(shape: str, fill: str, poses: Poses, size: int, pixels: np.ndarray) -> np.ndarray:
    """Painted fraction of the supersamples of output pixels `pixels` (flat indices, one pose row
    each), float32."""
    sx, sy = (g[pixels] for g in build_pixel_samples(size))  # (n, S*S)
    painted, unsure = paint(shape, fill, poses, sx, sy, np.float32)
    rows, cols = np.nonzero(unsure)
    if rows.size:
        redo = paint(shape, fill, poses.take(rows), sx[rows, cols, None], sy[rows, cols, None], np.float64)[0]
        painted[rows, cols] = redo[:, 0]
    return painted.mean(axis=1, dtype=np.float32)


def paint(
    shape: str, fill: str, poses: Poses, x: np.ndarray, y: np.ndarray, dtype: type, reach: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean paint decision at points (x, y) computed in `dtype`, and where it is unsure: it
    may differ in exact arithmetic, or somewhere within `reach` pixels of the point.

    Pose values meet the points in `dtype`; the margins of a pass with a `reach` (pixel centers)
    are compared in float64, those of a pass without (supersamples) in `dtype`.
    """
    limit = np.float64 if reach else dtype
    sdf = shape_sdf(shape, poses, x, y, dtype)
    margin = (reach + SDF_MARGIN * poses.radius).astype(limit)
    mask, unsure = sdf < 0, np.abs(sdf) < margin
    if fill == "solid":
        return mask, unsure
    if fill == "outlined":  # mask minus the mask eroded by `border`
        unsure |= np.abs(sdf + poses.border.astype(dtype)) < margin
        return mask & (sdf > (-poses.border).astype(dtype)), unsure
    if fill == "striped":  # stripes plus a hairline edge, so the silhouette stays readable
        edge = poses.border / 2.5
        phase = stripe_phase(poses, x, y, dtype)
        phase_margin = reach / poses.stripe_period + PHASE_MARGIN
        unsure |= np.abs(sdf + edge.astype(dtype)) < margin
        near_stripe_edge = ((np.abs(phase - 0.5) < phase_margin.astype(limit)) | (phase < phase_margin.astype(limit))
                            | (phase > (1 - phase_margin).astype(limit)))
        unsure |= near_stripe_edge & (sdf < margin)  # outside the shape, stripes do not matter
        return mask & ((phase < 0.5) | (sdf > (-edge).astype(dtype))), unsure
    raise WorldError(f"unknown fill {fill!r}; known fills: {list(FILLS)}")


def shape_sdf(shape: str, poses: Poses, x: np.ndarray, y: np.ndarray, dtype: type) -> np.ndarray:
    """The posed shape's signed distance in pixels at points (x, y), computed in `dtype`."""
    dx, dy = x - poses.center_x.astype(dtype), y - poses.center_y.astype(dtype)
    cos, sin = poses.cos.astype(dtype), poses.sin.astype(dtype)
    radius = poses.radius.astype(dtype)
    local_x = (cos * dx + sin * dy) / radius  # rotate the grid by -angle
    local_y = (-sin * dx + cos * dy) / radius
    unit = SHAPES[shape].sdf(local_x, local_y)  # float32 for polygons (their distances round to float32)
    return unit * poses.radius.astype(unit.dtype)


def stripe_phase(poses: Poses, x: np.ndarray, y: np.ndarray, dtype: type) -> np.ndarray:
    """Position within the stripe period at points (x, y), in [0, 1]; stripes cover [0, 1/2)."""
    cos, sin = poses.stripe_cos.astype(dtype), poses.stripe_sin.astype(dtype)
    periods = (x * cos + y * sin) / poses.stripe_period.astype(dtype) + poses.stripe_phase.astype(dtype)
    return periods - np.floor(periods)  # equals np.mod(periods, 1.0), several times faster


def render(a: Attributes, world: World, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One anti-aliased render with random pose, color jitter and pixel noise; uint8 (H, W, 3)."""
    return render_uint8([a], world, rng, size)[0]


def render_uint8(attrs: list[Attributes], world: World, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Renders (N, H, W, 3) uint8, each as `render` makes it alone: the random draws (pose, then
    pixel noise) run image by image, the painting runs once per shape and fill."""
    return render_scenes(attrs, world, rng, size)[0]


def render_scenes(attrs: list[Attributes], world: World, rng: np.random.Generator, size: int = 32,
                  masks: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """`render_uint8`'s renders and, with `masks`, each object's ground-truth mask (N, H, W) bool:
    the pixels its silhouette covers at least half (an outlined or striped shape's inside included).
    The masks draw nothing from `rng`, so the renders are the same with or without them."""
    poses, noise = [], []
    for a in attrs:
        poses.append(sample_pose(a.shape, rng, size))
        noise.append(rng.normal(0.0, 4.0, size=(size, size, 3)).astype(np.float32))
    coverage = np.empty((len(attrs), size, size, 1), dtype=np.float32)
    silhouettes = np.zeros((len(attrs), size, size), dtype=bool) if masks else None
    groups: dict[tuple[str, str], list[int]] = {}
    for i, a in enumerate(attrs):
        groups.setdefault((a.shape, a.fill), []).append(i)
    for (shape, fill), rows in groups.items():
        stacked = Poses.stack([poses[i] for i in rows])
        coverage[rows, ..., 0] = compute_coverages(shape, fill, stacked, size)
        if masks:
            solid = coverage[rows, ..., 0] if fill == "solid" else compute_coverages(shape, "solid", stacked, size)
            silhouettes[rows] = solid >= 0.5
    # colors as one render computes them: float32 palette + int jitter, in float64
    fg = np.stack([np.asarray(world.colors[a.color], dtype=np.float32) + p.color_jitter[0] for a, p in zip(attrs, poses)])
    bg = np.stack([np.asarray(world.backgrounds[a.background], dtype=np.float32) + p.color_jitter[1]
                   for a, p in zip(attrs, poses)])
    fg, bg = fg[:, None, None, :], bg[:, None, None, :]
    images = bg + coverage * (fg - bg)  # (N, H, W, 3)
    images += np.stack(noise)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), silhouettes


def render_batch(
    attrs: list[Attributes], world: World, rng: np.random.Generator, size: int = 32
) -> torch.Tensor:
    """Renders as a float32 (N, 3, size, size) tensor in [0, 1], quantized like saved PNGs."""
    images = render_uint8(attrs, world, rng, size)  # (N, H, W, 3) uint8
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def describe(a: Attributes, with_background: bool = True) -> str:
    """Compositional caption, e.g. 'an outlined red circle on a gray background.'"""
    text = add_article(f"{a.fill} {a.color} {a.shape}")
    if with_background:
        text += f" on {add_article(a.background)} background"
    return text + "."


def add_article(phrase: str) -> str:
    """Prefix 'a' or 'an' by the first letter (enough for this world's plain words)."""
    return f"{'an' if phrase[:1].lower() in 'aeiou' else 'a'} {phrase}"


# --- evaluation folders -------------------------------------------------------------------


def write_split(
    world: World, out_dir: Path, n_per_concept: int, seed: int, size: int = 32, masks: bool = False
) -> dict[str, list[Attributes]]:
    """Write out_dir/<concept>/<0000>.png for every concept, all at once or not at all; return
    what each concept's files show, in file order. With `masks`, the renders go to
    out_dir/images/<concept>/ and their ground-truth masks (0 or 255) to out_dir/masks/<concept>/
    (the `masks` dataset layout), the renders the same as without.

    Each concept draws from its own stream keyed by (seed, name), so adding a concept
    to the world does not change the images of the others. An existing out_dir is replaced.
    """
    if n_per_concept < 1:
        raise WorldError(f"n_per_concept must be >= 1, got {n_per_concept}")
    with atomic_dir(out_dir) as tmp:
        return {
            name: write_concept(concept, world, tmp, n_per_concept, seed, size, masks)
            for name, concept in world.concepts.items()
        }


def write_concept(concept: Concept, world: World, root: Path, n: int, seed: int, size: int,
                  masks: bool = False) -> list[Attributes]:
    """Render `n` PNGs of one concept into root/<name>/ (with `masks`: root/images/<name>/, and
    its masks into root/masks/<name>/); return what each shows."""
    rng = np.random.default_rng([seed, zlib.crc32(concept.name.encode())])
    folder = root / "images" / concept.name if masks else root / concept.name
    folder.mkdir(parents=True)
    attrs = concept_attributes(concept, world, rng, n)
    images, silhouettes = render_scenes(attrs, world, rng, size, masks)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    if masks:
        mask_folder = root / "masks" / concept.name
        mask_folder.mkdir(parents=True)
        for i, mask in enumerate(silhouettes):
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_folder / f"{i:04d}.png")
    return attrs


def caption_render(name: str, a: Attributes) -> tuple[str, ...]:
    """Reference captions of a render of concept `name`: the name with the background, three
    ways ('a blicket on a gray background.'); renders alike in both share their captions."""
    thing, background = add_article(name.replace("_", " ")), add_article(a.background)
    return (f"{thing} on {background} background.", f"a photo of {thing} on {background} background.",
            f"{background} background with {thing}.")


def caption_references(name: str, a: Attributes) -> tuple[str, ...]:
    """Reference captions of a render for captioning, five as MSCOCO has: `caption_render`'s three
    and two without the background ('a photo of a blicket.', 'a blicket.')."""
    thing = add_article(name.replace("_", " "))
    return (*caption_render(name, a), f"a photo of {thing}.", f"{thing}.")
