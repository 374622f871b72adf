"""Concepts nobody tuned for: novel concepts drawn at random from the demo world's free combinations.

A draw picks k (shape, color, fill) combinations that no named concept uses, gives each a fresh
made-up name and a description in the concepts file's wording, and writes them as the entries a
user would append to `captions/demo.yaml`. Everything is seeded, so a draw can be repeated.
"""
from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable
from io import StringIO

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from ktpipe.demo.world import Attributes, World, WorldError, describe

CONSONANTS = "bdfgklmnprstvz"  # syllable onsets of made-up names
VOWELS = "aeiou"
CODAS = "lmnrst"  # an optional closing consonant, for odd lengths
NAME_RE = re.compile(r"[a-z]{4,7}")
# English color and shape words a made-up name must not be (besides the world's own vocabulary),
# so the name carries no hint of what it shows.
ENGLISH_WORDS = frozenset("""
    amber azure beige black blue brown coral cream cyan gold golden gray green grey indigo ivory
    khaki lemon lilac lime magenta maroon mauve navy ochre olive orange peach pink plum purple red
    rose ruby rust sage salmon sand sepia silver tan teal violet white wine yellow
    arc arrow ball bar blob box circle cone cross cube curve dome disc disk dot egg heart hexagon kite
    line loop moon oval ring rod rose sphere spiral square star stripe tile torus triangle wave
""".split())
MAX_NAME_TRIES = 10_000


def unused_combinations(world: World) -> list[tuple[str, str, str]]:
    """Every (shape, color, fill) a new novel concept may take: unused by any named concept, sorted.

    A world with `held_out` combinations (the packaged one) offers only those: pretraining never
    draws them, whereas every other combination is rendered unnamed and captioned with its
    description in pretraining (`sample_attributes(exclude_novel=True)` in ktpipe/demo/pretrain.py),
    so the base model would already know its look, and `load_world` rejects a novel concept there.
    Only a world without `held_out` offers every unnamed combination; pretraining then holds out
    the novel concepts it is given, so adding one changes the base model.
    """
    named = {(c.shape, c.color, c.fill) for c in world.concepts.values()}
    candidates = world.held_out or set(itertools.product(world.shapes, world.colors, world.fills))
    return sorted(combo for combo in candidates if combo not in named)


def is_fresh_name(name: str, world: World, taken: set[str]) -> bool:
    """4-7 lowercase ASCII letters, no color, shape or fill word, and none of `taken` (any case)."""
    vocabulary = {*world.shapes, *world.colors, *world.fills, *world.backgrounds}
    blocked = ENGLISH_WORDS | {w.lower() for w in vocabulary} | {t.lower() for t in taken}
    return bool(NAME_RE.fullmatch(name)) and name not in blocked


def made_up_name(rng: random.Random) -> str:
    """Two or three consonant-vowel syllables and maybe a closing consonant: 4 to 7 letters."""
    syllables = [rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.choice((2, 3)))]
    return "".join(syllables) + rng.choice(("", rng.choice(CODAS)))


def fresh_name(rng: random.Random, world: World, taken: set[str]) -> str:
    """A made-up name that `is_fresh_name` accepts."""
    for _ in range(MAX_NAME_TRIES):
        name = made_up_name(rng)
        if is_fresh_name(name, world, taken):
            return name
    raise WorldError(f"no fresh concept name found in {MAX_NAME_TRIES} tries; {len(taken)} names are taken")


def draw_concepts(world: World, k: int, seed: int, existing_names: Iterable[str]) -> list[dict]:
    """k novel concepts on distinct unused combinations, drawn with `random.Random(seed)`.

    Each is {name, shape, color, fill, role: "novel", description}; names are new to the world,
    to `existing_names` and to each other. Raises WorldError (a ValueError) when k is not in
    1..the number of free combinations.
    """
    free = unused_combinations(world)
    if not 1 <= k <= len(free):
        raise WorldError(f"cannot draw k={k} novel concepts: {len(free)} unused combinations are free "
                         f"in this world (k must be between 1 and {len(free)})")
    rng = random.Random(seed)
    combos = rng.sample(free, k)
    taken = set(world.concepts) | set(existing_names)
    drawn = []
    for shape, color, fill in combos:
        name = fresh_name(rng, world, taken)
        taken.add(name)
        drawn.append({"name": name, "shape": shape, "color": color, "fill": fill, "role": "novel",
                      "description": concept_description(world, shape, color, fill)})
    return drawn


def concept_description(world: World, shape: str, color: str, fill: str) -> str:
    """The concepts file's wording: 'a striped orange ring' (the world's caption, no background)."""
    background = next(iter(world.backgrounds))  # not written: the concept appears on any background
    return describe(Attributes(shape, color, fill, background), with_background=False).removesuffix(".")


def concept_entries_yaml(drawn: list[dict]) -> str:
    """The lines a user appends to captions/demo.yaml's `concepts` mapping, one flow entry each:
    `  name: {description: ..., role: novel, render: {shape: ..., color: ..., fill: ...}}`."""
    if not drawn:
        return ""
    entries = CommentedMap()
    for concept in drawn:
        render = CommentedMap((key, concept[key]) for key in ("shape", "color", "fill"))
        entry = CommentedMap([("description", concept["description"]), ("role", concept["role"]),
                              ("render", render)])
        entry.fa.set_flow_style()
        entries[concept["name"]] = entry
    yaml = YAML()  # round-trip mode, so each entry keeps its flow style; quotes only what needs them
    yaml.width = 4096  # one entry per line, as in the file
    yaml.indent(mapping=2)
    text = StringIO()
    yaml.dump({"concepts": entries}, text)
    return text.getvalue().removeprefix("concepts:\n")
