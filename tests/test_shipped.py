"""The demo's base models ship pretrained (ktpipe/demo/base_models): the records match today's
pretraining code and the default params, the base_model stage copies a shipped model when they
match and pretrains, saying why, when they do not."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ktpipe import base_model
from ktpipe.demo import shipped
from ktpipe.concepts import load_concepts_file, world_concepts
from ktpipe.params import load_params

REPO = Path(__file__).resolve().parents[1]


def known_file(tmp_path: Path, params) -> Path:
    entries = load_concepts_file(REPO / params.concepts.file)
    path = tmp_path / "known.json"
    path.write_text(json.dumps({n: c for n, c in world_concepts(entries).items() if c["role"] == "known"}))
    return path


def demo_runs(params):
    """The demo params of the file's model and of each family, families starting from the shipped CLIP."""
    runs = [params, *(params.family(name) for name in params.families)]
    clip = str(shipped.SHIPPED / "demo")
    return [dataclasses.replace(r, pretrain=dataclasses.replace(r.pretrain, init_from=clip))
            if r.pretrain.init_from else r for r in runs]


def test_shipped_models_match_the_pretraining_code_and_default_params(tmp_path):
    params = load_params(REPO / "params.yaml")
    known = known_file(tmp_path, params)
    for run in demo_runs(params):
        record = shipped.read_shipped(run.model.backend)
        reason = shipped.mismatch(record, shipped.pretraining_record(run, known))
        assert reason is None, (f"the shipped {run.model.backend} model is stale ({reason}): regenerate it with "
                                "`ktpipe ship_base_models` and commit ktpipe/demo/base_models")
        files = {p.name for p in Path(record["folder"]).iterdir()}
        assert shipped.RECORD_FILE in files and len(files) >= 3  # checkpoint files beside the record
        assert record["torch"] and record["seconds"] > 0 and record["log"][-1]["loss"] > 0


def test_the_code_hash_follows_the_pretraining_modules_and_data():
    files = {str(p.relative_to(shipped.PACKAGE)) for p in shipped.code_files("demo_vilt")}
    assert {"demo/pretrain_cross.py", "demo/pretrain.py", "demo/world.py", "demo/vilt.py", "transfer/losses.py",
            "demo/world.yaml", "data/templates/demo.txt"} <= files
    assert "params.py" not in files and "eval/classification.py" not in files


@pytest.fixture
def tiny_demo(tmp_path, monkeypatch):
    """A params file of the demo backend, a shipped folder holding a stand-in checkpoint recorded for
    exactly those params, and a pretraining that records its calls instead of running."""
    params = load_params(REPO / "params.yaml")
    known = known_file(tmp_path, params)
    root = tmp_path / "shipped"
    (root / "demo").mkdir(parents=True)
    (root / "demo" / "open_clip_model.safetensors").write_bytes(b"weights")
    (root / "demo" / "open_clip_config.json").write_text("{}")
    record = shipped.pretraining_record(params, known)
    (root / "demo" / shipped.RECORD_FILE).write_text(json.dumps(
        {"record": record, "torch": "2.14.1", "seconds": 231.0, "log": [{"step": 449, "loss": 1.9}]}))
    monkeypatch.setattr(shipped, "SHIPPED", root)
    calls = []
    monkeypatch.setattr(base_model, "pretrain_demo", lambda *args: calls.append(args) or {"pretrained": True})
    return params, known, calls


def test_the_stage_copies_the_shipped_model_when_its_record_matches(tmp_path, tiny_demo):
    params, known, calls = tiny_demo
    out, log = tmp_path / "models/baseline", tmp_path / "base_model.json"
    params = dataclasses.replace(params, model=dataclasses.replace(params.model, pretrained=str(out)))
    summary = base_model.run_base_model(params, out, log, known)
    assert not calls and summary["shipped"] and summary["pretraining_seconds"] == 231.0
    assert (out / "open_clip_model.safetensors").read_bytes() == b"weights"
    assert not (out / shipped.RECORD_FILE).exists()
    assert json.loads(log.read_text())["final"]["loss"] == 1.9


def test_a_changed_pretraining_param_pretrains_and_says_why(tmp_path, tiny_demo, capsys):
    params, known, calls = tiny_demo
    out = tmp_path / "models/baseline"
    params = dataclasses.replace(params, model=dataclasses.replace(params.model, pretrained=str(out)))
    changed = dataclasses.replace(params, pretrain=dataclasses.replace(params.pretrain, steps=451))
    assert base_model.run_base_model(changed, out, tmp_path / "log.json", known) == {"pretrained": True}
    assert len(calls) == 1 and not out.exists()
    assert "pretraining the demo base model (it differs from the shipped one in pretrain.steps)" in capsys.readouterr().err


def test_another_known_concept_pretrains(tmp_path, tiny_demo, capsys):
    params, known, calls = tiny_demo
    out = tmp_path / "models/baseline"
    params = dataclasses.replace(params, model=dataclasses.replace(params.model, pretrained=str(out)))
    more = tmp_path / "more.json"
    more.write_text(json.dumps({**json.loads(known.read_text()),
                                "zork": {"shape": "star", "color": "red", "fill": "solid", "role": "known"}}))
    base_model.run_base_model(params, out, tmp_path / "log.json", more)
    assert len(calls) == 1 and "differs from the shipped one in known" in capsys.readouterr().err
