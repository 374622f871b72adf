"""Novel concepts drawn at random from the demo world's free combinations (ktpipe.demo.unseen)."""

import itertools
import re

import pytest
from ruamel.yaml import YAML

from conftest import DEMO_CONCEPTS_FILE
from ktpipe.concepts import load_concepts_file, world_concepts
from ktpipe.demo.unseen import (
    ENGLISH_WORDS,
    concept_entries_yaml,
    draw_concepts,
    is_fresh_name,
    unused_combinations,
)
from ktpipe.demo.world import World, load_world

SEEDS = range(200)


@pytest.fixture(scope="module")
def world() -> World:
    """The packaged world with the shipped concepts, as the pipeline builds it."""
    return load_world(concepts=world_concepts(load_concepts_file(DEMO_CONCEPTS_FILE)))


def named_combos(world: World) -> set[tuple[str, str, str]]:
    return {(c.shape, c.color, c.fill) for c in world.concepts.values()}


def combos_of(drawn: list[dict]) -> list[tuple[str, str, str]]:
    return [(d["shape"], d["color"], d["fill"]) for d in drawn]


def test_unused_combinations_are_the_free_held_out_ones(world):
    free = unused_combinations(world)
    expected = set(world.held_out) - named_combos(world)  # brute force: 12 held out, 3 taken by novel concepts
    assert set(free) == expected and len(free) == 9
    assert free == sorted(free) and len(set(free)) == len(free)


def test_unused_combinations_without_held_out_are_every_unnamed_one():
    world = load_world(concepts=world_concepts(load_concepts_file(DEMO_CONCEPTS_FILE)))
    world = World(world.shapes, world.colors, world.fills, world.backgrounds, world.concepts)  # no held_out
    every = set(itertools.product(world.shapes, world.colors, world.fills))
    assert unused_combinations(world) == sorted(every - named_combos(world))
    assert len(unused_combinations(world)) == 9 * 8 * 3 - 11


def test_draws_never_take_a_named_combination(world):
    named, seen = named_combos(world), set()
    for seed in SEEDS:
        combos = combos_of(draw_concepts(world, 3, seed, []))
        assert len(set(combos)) == 3, seed
        assert not set(combos) & named, seed
        assert set(combos) <= world.held_out, seed
        seen |= set(combos)
    assert seen == set(unused_combinations(world))  # every free combination is reachable


def test_draw_of_every_free_combination_takes_each_once(world):
    free = unused_combinations(world)
    drawn = draw_concepts(world, len(free), 7, [])
    assert sorted(combos_of(drawn)) == free
    assert len({d["name"] for d in drawn}) == len(free)


def test_same_seed_same_draw_other_seeds_differ(world):
    assert draw_concepts(world, 3, 11, ["x"]) == draw_concepts(world, 3, 11, ["x"])
    draws = [draw_concepts(world, 3, seed, []) for seed in range(20)]
    assert len({repr(d) for d in draws}) == 20
    assert len({tuple(combos_of(d)) for d in draws}) > 1  # the combinations move with the seed, not only names


def test_names_are_fresh_made_up_words(world):
    vocabulary = {*world.shapes, *world.colors, *world.fills, *world.backgrounds}
    existing = set(world.concepts) | {"zorbo"}
    for seed in SEEDS:
        names = [d["name"] for d in draw_concepts(world, 4, seed, existing)]
        assert len(set(names)) == 4, names
        for name in names:
            assert re.fullmatch(r"[a-z]{4,7}", name), name
            assert name not in existing and name not in vocabulary and name not in ENGLISH_WORDS, name


def test_existing_names_are_avoided(world):
    first = draw_concepts(world, 5, 3, [])
    taken = [d["name"] for d in first]
    again = draw_concepts(world, 5, 3, taken)
    assert combos_of(again) == combos_of(first)  # the combinations are drawn before the names
    assert not {d["name"] for d in again} & set(taken)


@pytest.mark.parametrize("name, ok", [
    ("bolemi", True), ("teal", False), ("oval", False), ("circle", False), ("orange", False),
    ("striped", False), ("brown", False), ("Bolemi", False), ("dax", False), ("kabolemi", False),
    ("bo1em", False), ("blicket", False), ("zorbo", False),
])
def test_is_fresh_name(world, name, ok):
    assert is_fresh_name(name, world, set(world.concepts) | {"Zorbo"}) is ok


def test_drawn_concepts_are_novel_and_described_like_the_concepts_file(world):
    shipped = load_concepts_file(DEMO_CONCEPTS_FILE)
    assert shipped["dax"].description == "an outlined pink triangle"  # the wording to match
    for seed in range(20):
        for d in draw_concepts(world, 3, seed, []):
            assert d["role"] == "novel"
            article = "an" if d["fill"][0] in "aeiou" else "a"
            assert d["description"] == f"{article} {d['fill']} {d['color']} {d['shape']}"


@pytest.mark.parametrize("k", [10, 50])
def test_too_many_concepts_raise_naming_k_and_the_free_count(world, k):
    with pytest.raises(ValueError, match=rf"k={k}\b.*\b9 unused combinations are free"):
        draw_concepts(world, k, 0, [])


@pytest.mark.parametrize("k", [0, -1])
def test_nonpositive_k_raises(world, k):
    with pytest.raises(ValueError, match=rf"k={k}\b"):
        draw_concepts(world, k, 0, [])


def test_entries_yaml_parses_with_the_concepts_file_keys(world):
    drawn = draw_concepts(world, 3, 5, [])
    text = concept_entries_yaml(drawn)
    assert len(text.splitlines()) == 3 and all(line.startswith("  ") for line in text.splitlines())
    entries = YAML(typ="safe", pure=True).load("concepts:\n" + text)["concepts"]
    shipped = YAML(typ="safe", pure=True).load(DEMO_CONCEPTS_FILE.read_text())["concepts"]
    shipped_keys = {tuple(e) for e in shipped.values()}
    shipped_render_keys = {tuple(e["render"]) for e in shipped.values()}
    assert list(entries) == [d["name"] for d in drawn]
    for d in drawn:
        entry = entries[d["name"]]
        assert {tuple(entry)} == shipped_keys and {tuple(entry["render"])} == shipped_render_keys
        assert entry["role"] == "novel"
        assert entry["render"] == {"shape": d["shape"], "color": d["color"], "fill": d["fill"]}
        assert entry["description"] == d["description"]
        assert all(d[key] in entry["description"].split() for key in ("shape", "color", "fill"))


def test_entries_appended_to_the_concepts_file_load_into_the_world(world, tmp_path):
    drawn = draw_concepts(world, 4, 9, world.concepts)
    path = tmp_path / "demo.yaml"
    path.write_text(DEMO_CONCEPTS_FILE.read_text().rstrip("\n") + "\n" + concept_entries_yaml(drawn))
    concepts = load_concepts_file(path)
    grown = load_world(concepts=world_concepts(concepts))  # rejects a novel concept pretraining shows
    assert len(grown.concepts) == len(world.concepts) + 4
    for d in drawn:
        concept = grown.concepts[d["name"]]
        assert (concept.shape, concept.color, concept.fill, concept.role) == (d["shape"], d["color"], d["fill"], "novel")
        assert concepts[d["name"]].description == d["description"]
    assert len(unused_combinations(grown)) == len(unused_combinations(world)) - 4


def test_entries_yaml_quotes_what_yaml_would_misread():
    drawn = [{"name": "null", "shape": "a: b", "color": "#x", "fill": "true", "role": "novel", "description": "x, y"}]
    entries = YAML(typ="safe", pure=True).load("concepts:\n" + concept_entries_yaml(drawn))["concepts"]
    assert entries == {"null": {"description": "x, y", "role": "novel",
                                "render": {"shape": "a: b", "color": "#x", "fill": "true"}}}
    assert concept_entries_yaml([]) == ""


def test_repeated_taken_and_blocked_names_are_skipped(world, monkeypatch):
    import ktpipe.demo.unseen as unseen
    proposals = iter(["bolo", "bolo", "teal", "blicket", "zorbo", "kima", "bolo", "kima", "rufe"])
    monkeypatch.setattr(unseen, "made_up_name", lambda rng: next(proposals))
    names = [d["name"] for d in draw_concepts(world, 3, 0, ["zorbo"])]
    assert names == ["bolo", "kima", "rufe"]
