"""Concept descriptions: fine-tuning captions, the concepts file format, per-concept files."""

import json
from pathlib import Path

import pytest

from ktpipe.errors import KtpipeError

import ktpipe.describe as describe_module
from ktpipe.concepts import (
    GENERATED_HEADER,
    ConceptsError,
    ConceptText,
    finetune_caption,
    load_concepts_file,
    load_generated,
    read_concept_file,
    world_concepts,
    write_concept_files,
    write_generated,
)
from ktpipe.describe import run_concepts
from ktpipe.params import ConceptsParams
from ktpipe.demo.world import Attributes, describe, load_world

CONCEPTS_DIR = Path(__file__).resolve().parents[1] / "captions"
DEMO_CONCEPTS_FILE = CONCEPTS_DIR / "demo.yaml"
COCO_CLASSES = [  # MSCOCO's 80 object categories, in category-id order
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]
# concepts file -> (paper table, its concepts in order)
PAPER_CONCEPTS = {
    "rare_concepts": (12, ["moongate", "tonometer", "gyroscope"]),
    "rare_concepts_vilt": (13, ["moongate", "tonometer", "gyroscope"]),
    "jsrt": (14, ["benign_nodule", "lung_cancer"]),
    "chexpert_5x200c": (15, ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion"]),
    "segmentation": (16, ["lung_nodules", "breast_tumor", "pneumothorax", "brain_tumor"]),
    "mscoco": (17, [c.replace(" ", "_") for c in COCO_CLASSES]),
}


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


@pytest.mark.parametrize("concept, caption", [
    (ConceptText("lung_cancer", "a dense and irregular mass"), "A lung cancer is a dense and irregular mass."),
    (ConceptText("hair_drier", "a handheld device", label="hair dryer"), "A hair dryer is a handheld device."),
    (ConceptText("tv", "a rectangular screen", label="TV set"), "A TV set is a rectangular screen."),
])
def test_finetune_caption_uses_the_label(concept, caption):
    assert finetune_caption(concept) == caption


def test_finetune_caption_without_name_prefix():
    assert finetune_caption(ConceptText("blicket", "a striped orange ring"), name_prefix=False) == (
        "A striped orange ring."
    )


def test_load_demo_concepts():
    concepts = load_concepts_file(DEMO_CONCEPTS_FILE)
    assert len(concepts) == 11
    assert sorted(n for n, c in concepts.items() if c.role == "novel") == ["blicket", "dax", "wug"]
    assert concepts["blicket"].description == "a striped orange ring"
    assert concepts["blicket"].source == "hand-written for the ktpipe demo world"


def test_demo_concepts_agree_with_the_world():
    concepts = load_concepts_file(DEMO_CONCEPTS_FILE)
    world = load_world(concepts=world_concepts(concepts))
    assert not load_world().concepts  # the packaged world holds vocabularies only
    for name, text in concepts.items():
        assert name in world.concepts, name
        concept = world.concepts[name]
        assert text.role == concept.role, name
        expected = describe(Attributes(concept.shape, concept.color, concept.fill, "black"), with_background=False)
        assert text.description == expected.removesuffix("."), name


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "concepts.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("concepts: {blicket: [unclosed\n", "cannot parse"),
        ("source: somewhere\n", "'concepts'"),
        ("concepts: {}\n", "'concepts'"),
        ("concepts: {blicket: {description: '  '}}\n", "'blicket' has no description"),
        ("concepts: {blicket: {description: 3}}\n", "'blicket' has no description"),
        ("concepts: {lung cancer: a mass}\n", "'lung cancer' is not an identifier.*'label'"),
        ("concepts: {blicket: {description: a ring, label: ''}}\n", "'blicket': label must be a non-empty string"),
        ("concepts: {blicket: {description: a ring, source: [x]}}\n", "'blicket': source must be"),
        ("concepts: {blicket: [a ring]}\n", "'blicket' must be a mapping"),
        ("concepts: {blicket: {description: a ring, role: new}}\n", "'blicket' has role 'new'"),
        ("concepts: {blicket: {description: a ring, typo: x}}\n", r"'blicket' has unknown key\(s\) \['typo'\]"),
        ("concepts: {blicket: {description: a ring, aliases: bli}}\n", "'blicket': aliases"),
    ],
)
def test_malformed_concepts_files_are_named(tmp_path, text, message):
    with pytest.raises(ConceptsError, match=message):
        load_concepts_file(write(tmp_path, text))


def test_missing_concepts_file(tmp_path):
    with pytest.raises(ConceptsError, match="not found"):
        load_concepts_file(tmp_path / "nope.yaml")


def test_description_string_shorthand(tmp_path):
    concepts = load_concepts_file(write(tmp_path, "concepts: {blicket: a striped orange ring}\n"))
    assert concepts["blicket"] == ConceptText("blicket", "a striped orange ring", "novel")


@pytest.mark.parametrize("entry", ["null", "{}", "{role: known, label: Blicket}"])
def test_concepts_without_description_are_left_to_generate(tmp_path, entry):
    concepts = load_concepts_file(write(tmp_path, f"concepts:\n  blicket: {entry}\n  dax: a pink triangle\n"))
    assert not concepts["blicket"].described and concepts["dax"].described
    with pytest.raises(ConceptsError, match="concept 'blicket' has no description.*'concepts.generator'"):
        run_concepts(tmp_path / "concepts.yaml", tmp_path / "generated.yaml", names("dax", "blicket"), tmp_path / "out")


def test_label_is_read(tmp_path):
    path = write(tmp_path, "concepts: {hair_drier: {description: a device, label: hair dryer}}\n")
    concepts = load_concepts_file(path)
    assert concepts["hair_drier"].text_name == "hair dryer"


def test_run_concepts_keeps_the_params_order_and_names_an_undescribed_one(tmp_path):
    out = tmp_path / "out"
    concepts = run_concepts(DEMO_CONCEPTS_FILE, tmp_path / "generated.yaml", names("wug", "blicket"), out)
    assert [c.name for c in concepts] == ["wug", "blicket"]
    with pytest.raises(ConceptsError, match="'gazorp'"):
        run_concepts(DEMO_CONCEPTS_FILE, tmp_path / "generated.yaml", names("blicket", "gazorp"), out)


def names(*concepts: str) -> ConceptsParams:
    """The concepts section naming `concepts` (no generator, no truncation)."""
    return ConceptsParams(names=concepts)


def test_run_concepts_writes_one_file_per_concept(tmp_path):
    out, generated = tmp_path / "concepts", tmp_path / "generated.yaml"
    run_concepts(DEMO_CONCEPTS_FILE, generated, names("blicket", "lantern"), out)
    assert sorted(p.name for p in out.iterdir()) == ["blicket.json", "lantern.json"]
    assert read_concept_file(out / "lantern.json").role == "known"
    # nothing needed generating: the generated file is its header with no entries
    assert generated.read_text() == GENERATED_HEADER and load_generated(generated) == {}


def test_run_concepts_leaves_nothing_on_error(tmp_path, monkeypatch):
    generated = tmp_path / "cache" / "generated.yaml"
    with pytest.raises(ConceptsError, match="concept 'gazorp' has no description"):
        run_concepts(DEMO_CONCEPTS_FILE, generated, names("blicket", "gazorp"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # the generated file is not written either

    def write_then_fail(concepts, out_dir):
        write_concept_files(concepts[:1], out_dir)
        raise RuntimeError("disk full")

    monkeypatch.setattr(describe_module, "write_concept_files", write_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        run_concepts(DEMO_CONCEPTS_FILE, generated, names("blicket", "dax"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no output folder, no temporary leftovers


def test_run_concepts_rejects_bad_names(tmp_path):
    with pytest.raises(ConceptsError, match="params 'concepts.names': concept name 'lung cancer' is not an identifier"):
        run_concepts(DEMO_CONCEPTS_FILE, tmp_path / "generated.yaml", names("blicket", "lung cancer"), tmp_path / "out")
    with pytest.raises(ConceptsError, match="params 'concepts.names' is empty"):
        run_concepts(DEMO_CONCEPTS_FILE, tmp_path / "generated.yaml", names(), tmp_path / "out")


def test_generated_entries_fill_undescribed_concepts_without_a_generator(tmp_path):
    concepts_file = write(tmp_path, "concepts:\n  blicket: a striped orange ring\n  moongate: {label: moon gate}\n")
    generated = tmp_path / "generated.yaml"
    write_generated(generated, [ConceptText("moongate", "a round arch", source="by hand"),
                                ConceptText("blicket", "not used: the concepts file wins", source="x"),
                                ConceptText("gyroscope", "silver rings", source="y")])
    before = generated.read_text()
    concepts = run_concepts(concepts_file, generated, names("blicket", "moongate", "gyroscope"), tmp_path / "out")
    assert [c.description for c in concepts] == ["a striped orange ring", "a round arch", "silver rings"]
    assert concepts[1] == ConceptText("moongate", "a round arch", source="by hand", label="moon gate")
    assert generated.read_text() == before  # nothing generated: the file is not rewritten


def test_write_generated_keeps_user_comments_and_entries(tmp_path):
    generated = tmp_path / "generated.yaml"
    generated.write_text(GENERATED_HEADER.replace("concepts: {}", "concepts:  # my note\n  dax: a pink thing"))
    write_generated(generated, [ConceptText("wug", "a purple crescent", source="generated with m")])
    text = generated.read_text()
    assert "# my note" in text and text.startswith(GENERATED_HEADER.split("concepts:")[0])
    assert {n: c.description for n, c in load_generated(generated).items()} == {
        "dax": "a pink thing", "wug": "a purple crescent"}


def test_concept_file_round_trip(tmp_path):
    concept = ConceptText("wug", "a solid purple crescent", "novel", ("moon", "wuggy"), "a wug.", "test", "Wug")
    write_concept_files([concept], tmp_path)
    assert read_concept_file(tmp_path / "wug.json") == concept
    with pytest.raises(ConceptsError, match="concepts stage"):
        read_concept_file(tmp_path / "dax.json")


# --- the paper's descriptions (supplementary Tables 12 to 17) --------------------------------


def test_every_concepts_file_loads():
    for path in sorted(CONCEPTS_DIR.glob("*.yaml")):
        loaded = load_generated(path) if path.name == "generated.yaml" else load_concepts_file(path)
        assert all(c.described for c in loaded.values()), path.name
    assert set(PAPER_CONCEPTS) <= {p.stem for p in CONCEPTS_DIR.glob("*.yaml")}


def test_repo_generated_file_is_empty_and_documented():
    path = CONCEPTS_DIR / "generated.yaml"
    assert load_generated(path) == {} and "Edit freely" in path.read_text()


@pytest.mark.parametrize("stem", sorted(PAPER_CONCEPTS))
def test_paper_concepts_file(stem):
    table, expected = PAPER_CONCEPTS[stem]
    path = CONCEPTS_DIR / f"{stem}.yaml"
    concepts = load_concepts_file(path)
    assert list(concepts) == expected
    assert all(c.source.startswith(f"Barbano et al., Table {table}: ") for c in concepts.values())
    assert all(c.role == "novel" and c.described and not c.label for c in concepts.values())
    assert f"Table {table}" in path.read_text().split("source:")[0]  # the header comment names it too


def test_paper_descriptions_are_verbatim():
    rare = load_concepts_file(CONCEPTS_DIR / "rare_concepts.yaml")
    assert rare["moongate"].description.startswith("A perfectly circular archway built from uniformly cut stones")
    assert "Llama-3-8B-Instruct" in rare["moongate"].source
    vilt = load_concepts_file(CONCEPTS_DIR / "rare_concepts_vilt.yaml")
    assert vilt["gyroscope"].description == ("A series of rings each nested within the next, surrounds a central "
                                             "disk that spins. The rings are connected by intersecting axes allowing "
                                             "the disk to rotate freely.")
    jsrt = load_concepts_file(CONCEPTS_DIR / "jsrt.yaml")
    assert jsrt["benign_nodule"].description.startswith("A small, round spots appearing in Chest X-Ray")
    assert finetune_caption(jsrt["lung_cancer"]).startswith("A lung cancer is a dense and irregular mass on Chest")
    coco = load_concepts_file(CONCEPTS_DIR / "mscoco.yaml")
    assert coco["stop_sign"].description == (
        'A red, octagonal sign with the word "STOP" in white, used to indicate where vehicles must halt.')
    assert coco["toothbrush"].description == "A small brush with a handle, used for cleaning teeth."
    assert [c.text_name for c in coco.values()] == COCO_CLASSES


# --- command line ----------------------------------------------------------------------------


def test_cli_concepts_writes_the_generated_file_and_the_world_where_told(tmp_path, tiny_checkpoint):
    from click.testing import CliRunner

    from conftest import make_project
    from stages.cli import main as cli

    project = make_project(tmp_path / "project", tiny_checkpoint, concepts={"names": ["blicket", "dax"]})
    paths = [str(DEMO_CONCEPTS_FILE), str(tmp_path / "gen.yaml"), str(tmp_path / "out"), str(tmp_path / "world.json"),
             str(tmp_path / "known.json")]
    result = CliRunner().invoke(cli, ["captions", "--params", str(project / "params.yaml"), *paths])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "gen.yaml").read_text() == GENERATED_HEADER
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["blicket.json", "dax.json"]
    assert set(json.loads((tmp_path / "world.json").read_text())) == set(load_concepts_file(DEMO_CONCEPTS_FILE))
    assert not (project / "captions/generated.yaml").exists()  # no default beside the params file
    known = json.loads((tmp_path / "known.json").read_text())  # what pretraining reads: the known concepts alone
    assert set(known) == {n for n, c in load_concepts_file(DEMO_CONCEPTS_FILE).items() if c.role == "known"}
    result = CliRunner().invoke(cli, ["captions", "--params", str(project / "params.yaml"), *paths, "extra"])
    assert result.exit_code == 2 and "unexpected extra argument" in result.output


def test_render_entries_must_name_shape_color_and_fill(tmp_path):
    path = write(tmp_path, "concepts:\n  zork: {description: a red star, render: {shape: star, color: red}}\n")
    with pytest.raises(ConceptsError, match="zork.*render"):
        load_concepts_file(path)


def test_world_file_lists_every_rendered_concept(tmp_path):
    path = write(tmp_path, "concepts:\n"
                           "  zork: {description: a pink star, role: novel, render: {shape: star, color: pink, fill: outlined}}\n"
                           "  plain: {description: a thing}\n")
    world_path = tmp_path / "world.json"
    run_concepts(path, tmp_path / "generated.yaml", names("plain"), tmp_path / "out", world_path=world_path,
                 known_path=tmp_path / "known.json")
    # every rendered entry of the file, not only the params concepts: the world must keep a novel
    # concept out of pretraining even in a run that does not learn it
    assert json.loads(world_path.read_text()) == {"zork": {"shape": "star", "color": "pink", "fill": "outlined",
                                                           "role": "novel"}}
    assert json.loads((tmp_path / "known.json").read_text()) == {}  # pretraining never reads a novel concept


def test_a_novel_concept_on_a_combination_pretraining_shows_is_refused(tmp_path):
    path = write(tmp_path, "concepts:\n"
                           "  zork: {description: a red star, role: novel, render: {shape: star, color: red, fill: solid}}\n")
    with pytest.raises(KtpipeError, match=r"novel concept 'zork': star red solid is shown in pretraining.*star pink outlined"):
        run_concepts(path, tmp_path / "generated.yaml", names("zork"), tmp_path / "out",
                     world_path=tmp_path / "world.json", known_path=tmp_path / "known.json")
    assert not (tmp_path / "world.json").exists() and not (tmp_path / "known.json").exists()
