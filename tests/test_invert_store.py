"""The invert stage inverts every concept in one process and copies, from the inversion store, each
concept whose inputs did not change: one edited description recomputes that concept only, and the
others' tensors stay bit-identical; whatever the store holds, the folders are those a run without it
writes."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from conftest import run_stage_here, write_params
from ktpipe.params import load_params
from ktpipe.transfer.invert import inversion_key, model_digest

CONCEPTS = ["blicket", "dax", "lantern"]


def invert(project: Path, out: str, *flags: str) -> dict:
    result = run_stage_here(project, "invert", "data/concepts", out, "--timing", f"metrics/{out}.json", *flags)
    assert result.returncode == 0, result.stderr
    return {name: entry["how"] for name, entry in
            json.loads((project / f"metrics/{out}.json").read_text())["concepts"].items()}


def images(project: Path, out: str) -> dict[str, bytes]:
    return {name: (project / out / name / "images.safetensors").read_bytes() for name in CONCEPTS}


@pytest.fixture
def project(tiny_project):
    write_params(tiny_project, concepts={"names": CONCEPTS})
    result = run_stage_here(tiny_project, "captions", "captions/demo.yaml", "captions/generated.yaml", "data/concepts",
                            "data/world.json", "data/known.json")
    assert result.returncode == 0, result.stderr
    return tiny_project


def test_an_edited_description_recomputes_that_concept_only(project):
    assert invert(project, "first") == {name: "computed" for name in CONCEPTS}
    assert invert(project, "again") == {name: "reused" for name in CONCEPTS}
    assert images(project, "again") == images(project, "first")

    concept = project / "data/concepts/dax.json"
    record = json.loads(concept.read_text())
    concept.write_text(json.dumps({**record, "description": "a solid pink triangle"}))
    assert invert(project, "edited") == {"blicket": "reused", "dax": "computed", "lantern": "reused"}
    first, edited = images(project, "first"), images(project, "edited")
    assert edited["dax"] != first["dax"]
    assert all(edited[name] == first[name] for name in ("blicket", "lantern"))

    # the store only saves time: without it every concept is computed, to the same bytes
    assert invert(project, "fresh", "--store", "") == {name: "computed" for name in CONCEPTS}
    assert images(project, "fresh") == edited
    assert not list(project.glob("*/.*tmp*")) and not list((project / ".ktpipe/store/invert").glob(".*tmp*"))


def test_the_store_key_follows_every_input(project):
    params = load_params(project / "params.yaml")
    from ktpipe.concepts import read_concept_file

    concept = read_concept_file(project / "data/concepts/blicket.json")
    model = model_digest(params.model)
    key = inversion_key(params, concept, model, "cpu")
    assert key == inversion_key(load_params(project / "params.yaml"), concept, model, "cpu")
    write_params(project, invert={"steps": 4})
    assert inversion_key(load_params(project / "params.yaml"), concept, model, "cpu") != key
    write_params(project, invert={"steps": 3}, seed=1)
    assert inversion_key(load_params(project / "params.yaml"), concept, model, "cpu") != key
    write_params(project, seed=0)
    assert inversion_key(load_params(project / "params.yaml"), concept, model, "cpu") == key
    assert inversion_key(params, concept, model, "cuda") != key
    other = read_concept_file(project / "data/concepts/dax.json")
    assert inversion_key(params, other, model, "cpu") != key

    # the base model's bytes, not only its name: a retrained checkpoint in the same folder is another model
    folder = project / "checkpoint"
    shutil.copytree(params.model.name.removeprefix("local-dir:"), folder)
    moved = dataclasses.replace(params.model, name=f"local-dir:{folder}")
    before = model_digest(moved)
    weights = max(folder.iterdir(), key=lambda path: path.stat().st_size)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_digest(moved) != before


def test_a_missing_concept_file_names_it_and_writes_nothing(project):
    write_params(project, concepts={"names": [*CONCEPTS, "zork"]})
    result = run_stage_here(project, "invert", "data/concepts", "data/inverted")
    assert result.returncode == 2 and "data/concepts/zork.json" in result.stderr
    assert not (project / "data/inverted").exists()
    assert not list((project / "data").glob(".inverted*"))
