"""Concept descriptions: fine-tuning captions, the captions file format, per-concept files."""

from pathlib import Path

import pytest

import ktpipe.captions as captions_module
from ktpipe.captions import (
    CaptionsError,
    ConceptText,
    finetune_caption,
    load_captions,
    read_concept_file,
    run_captions,
    select_concepts,
    write_concept_files,
)
from ktpipe.world import Attributes, describe, load_world

DEMO_CAPTIONS = Path(__file__).resolve().parents[1] / "captions" / "demo.yaml"


@pytest.mark.parametrize(
    "name, description, caption",
    [
        ("blicket", "a striped orange ring", "A blicket is a striped orange ring."),
        ("owl", "a bird with big eyes.", "An owl is a bird with big eyes."),
        ("Emu", "a large bird", "An Emu is a large bird."),
        ("nodule", "CT-visible round opacity", "A nodule is CT-visible round opacity."),
        ("nodule", "CT scan shows a round opacity", "A nodule is CT scan shows a round opacity."),
        ("moongate", "A perfectly circular archway", "A moongate is a perfectly circular archway."),
    ],
)
def test_finetune_caption(name, description, caption):
    assert finetune_caption(ConceptText(name, description)) == caption


def test_finetune_caption_without_name_prefix():
    assert finetune_caption(ConceptText("blicket", "a striped orange ring"), name_prefix=False) == (
        "A striped orange ring."
    )


def test_load_demo_captions():
    concepts = load_captions(DEMO_CAPTIONS)
    assert len(concepts) == 11
    assert sorted(n for n, c in concepts.items() if c.role == "novel") == ["blicket", "dax", "wug"]
    assert concepts["blicket"].description == "a striped orange ring"
    assert concepts["blicket"].source == "hand-written for the ktpipe demo world"


def test_demo_captions_agree_with_the_world():
    world = load_world()
    for name, text in load_captions(DEMO_CAPTIONS).items():
        assert name in world.concepts, name
        concept = world.concepts[name]
        assert text.role == concept.role, name
        expected = describe(Attributes(concept.shape, concept.color, concept.fill, "black"), with_background=False)
        assert text.description == expected.removesuffix("."), name


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "captions.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("concepts: {blicket: [unclosed\n", "cannot parse"),
        ("source: somewhere\n", "'concepts'"),
        ("concepts: {}\n", "'concepts'"),
        ("concepts: {blicket: {role: novel}}\n", "'blicket' has no description"),
        ("concepts: {blicket: {description: '  '}}\n", "'blicket' has no description"),
        ("concepts: {blicket: {description: a ring, role: new}}\n", "'blicket' has role 'new'"),
        ("concepts: {blicket: {description: a ring, typo: x}}\n", r"'blicket' has unknown key\(s\) \['typo'\]"),
        ("concepts: {blicket: {description: a ring, aliases: bli}}\n", "'blicket': aliases"),
    ],
)
def test_malformed_captions_are_named(tmp_path, text, message):
    with pytest.raises(CaptionsError, match=message):
        load_captions(write(tmp_path, text))


def test_missing_captions_file(tmp_path):
    with pytest.raises(CaptionsError, match="not found"):
        load_captions(tmp_path / "nope.yaml")


def test_description_string_shorthand(tmp_path):
    concepts = load_captions(write(tmp_path, "concepts: {blicket: a striped orange ring}\n"))
    assert concepts["blicket"] == ConceptText("blicket", "a striped orange ring", "novel")


def test_select_concepts_names_the_undescribed_one():
    concepts = load_captions(DEMO_CAPTIONS)
    assert [c.name for c in select_concepts(concepts, ["wug", "blicket"])] == ["wug", "blicket"]
    with pytest.raises(CaptionsError, match="'gazorp'"):
        select_concepts(concepts, ["blicket", "gazorp"])


def test_run_captions_writes_one_file_per_concept(tmp_path):
    out = tmp_path / "captions"
    run_captions(DEMO_CAPTIONS, ("blicket", "lantern"), out)
    assert sorted(p.name for p in out.iterdir()) == ["blicket.json", "lantern.json"]
    assert read_concept_file(out / "lantern.json").role == "known"


def test_run_captions_leaves_nothing_on_error(tmp_path, monkeypatch):
    with pytest.raises(CaptionsError):
        run_captions(DEMO_CAPTIONS, ("blicket", "gazorp"), tmp_path / "captions")

    def write_then_fail(concepts, out_dir):
        write_concept_files(concepts[:1], out_dir)
        raise RuntimeError("disk full")

    monkeypatch.setattr(captions_module, "write_concept_files", write_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        run_captions(DEMO_CAPTIONS, ("blicket", "dax"), tmp_path / "captions")
    assert list(tmp_path.iterdir()) == []  # no output folder and no temporary leftovers


def test_concept_file_round_trip(tmp_path):
    concept = ConceptText("wug", "a solid purple crescent", "novel", ("moon", "wuggy"), "a wug.", "test")
    write_concept_files([concept], tmp_path)
    assert read_concept_file(tmp_path / "wug.json") == concept
    with pytest.raises(CaptionsError, match="captions stage"):
        read_concept_file(tmp_path / "dax.json")
