"""Captioning: pycocoevalcap's scores at their extremes and against a hand-computed BLEU, groups,
SPICE left out with a note (never a zero), Java and references checked before anything runs, the
task end to end through run_evaluate with fake captioners (JSON lines beside the metrics), the
report's table and examples, and the MSCOCO Karpathy layout. No network: SPICE's download is
stubbed to fail, and the METEOR process starts once per test worker."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fakes import FakeCaptioner
from ktpipe import eval as evaluation
from ktpipe import models
from stages.cli import main as cli
from ktpipe.concepts import ConceptText, read_concepts, write_concept_files
from ktpipe.datasets import CaptionedImage, Manifest, load_dataset, write_manifest
from ktpipe.errors import KtpipeError
from ktpipe.eval import captioning as cap
from ktpipe.eval.base import TaskInput
from ktpipe.images import DatasetError
from ktpipe.models import LOCAL_DIR
from ktpipe.params import DatasetParams, EvaluateParams, Params, build_section, validate
from ktpipe.report import set_section

REAL_MISSING_JARS = cap.missing_corenlp_jars  # before the fixture below stubs it
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's scorers run Java")

CONCEPTS = [ConceptText("blicket", "a red ring"), ConceptText("dax", "a green ring"),
            ConceptText("lantern", "a blue ring", role="known")]
COLORS = {"blicket": ("red", (230, 20, 20)), "dax": ("green", (20, 230, 20)), "lantern": ("blue", (20, 20, 230))}
REFERENCES = [["a red ring on a table"], ["two green dogs play in the park"], ["a blue car parked near the old house"]]


@pytest.fixture(autouse=True)
def no_corenlp(monkeypatch):
    """SPICE's jars are missing and their download fails, whatever this machine has."""
    def no_download(timeout):
        raise OSError("no network in tests")

    monkeypatch.setattr(cap, "missing_corenlp_jars", lambda: list(cap.CORENLP_JARS))
    monkeypatch.setattr(cap, "fetch_corenlp", no_download)


@pytest.fixture(scope="module")
def meteor():
    """One METEOR process for the module (it takes seconds to load)."""
    if shutil.which("java") is None:
        pytest.skip("pycocoevalcap's METEOR runs Java")
    with cap.meteor_scorer() as scorer:
        yield scorer


@pytest.fixture
def shared_meteor(monkeypatch, meteor):
    """The task's METEOR process is the module's (the task would start its own)."""
    monkeypatch.setattr(cap, "meteor_scorer", lambda: contextlib.nullcontext(meteor))
    return meteor


class FakeMeteor:
    """METEOR's process handle without Java: a process that waits."""

    def __init__(self):
        self.meteor_p = subprocess.Popen(["sleep", "60"], stdin=subprocess.PIPE)


def test_one_meteor_process_serves_every_evaluation_of_a_process(monkeypatch):
    """A stage evaluating two models starts METEOR's Java once; one that ended, or that an error left
    mid-exchange, is replaced by a new one."""
    monkeypatch.setattr(cap, "Meteor", FakeMeteor)
    monkeypatch.setattr(cap, "_METEOR", [])
    with cap.meteor_scorer() as first, cap.meteor_scorer() as again:
        assert again is first and first.meteor_p.poll() is None
    first.meteor_p.kill()
    first.meteor_p.wait()
    with cap.meteor_scorer() as fresh:
        assert fresh is not first and fresh.meteor_p.poll() is None
    with pytest.raises(RuntimeError), cap.meteor_scorer():
        raise RuntimeError("a failed evaluation")
    assert fresh.meteor_p.poll() is not None  # stopped, not handed to the next evaluation
    with cap.meteor_scorer() as last:
        assert last is not fresh
    cap.stop_meteor(last)


# --- scores -----------------------------------------------------------------------------------


@needs_java
def test_identical_captions_score_the_maxima_and_disjoint_ones_zero(meteor):
    found, per_image, note = cap.score_captions(REFERENCES, [r[0] for r in REFERENCES], {}, False, meteor)
    assert note is None and found["n_images"] == 3
    for n in (1, 2, 3, 4):
        assert found[f"bleu{n}"] == pytest.approx(1.0, abs=1e-6)
    assert found["cider"] == pytest.approx(10.0)  # CIDEr-D: 10 x the mean cosine over 1- to 4-grams
    assert found["meteor"] == pytest.approx(1.0) and found["rouge_l"] == pytest.approx(1.0)
    assert per_image["meteor"] == pytest.approx([1.0, 1.0, 1.0]) and per_image["cider"] == pytest.approx([10.0] * 3)
    assert "spice" not in found and "spice" not in per_image

    found, per_image, _ = cap.score_captions(REFERENCES, ["zebra xylophone", "quietly", "umbrellas everywhere"],
                                             {}, False, meteor)
    assert found["bleu4"] == pytest.approx(0.0, abs=1e-6) and found["bleu1"] == pytest.approx(0.0, abs=1e-6)
    assert found["cider"] == 0.0 and found["rouge_l"] == 0.0 and found["meteor"] == 0.0
    assert per_image["meteor"] == [0.0, 0.0, 0.0] and len(per_image["bleu4"]) == 3


@needs_java
def test_bleu1_matches_a_hand_computed_value(meteor):
    # 'a red ring' against 'a red ring on a table': every unigram matches, brevity penalty e^(1 - 6/3)
    found, _, _ = cap.score_captions([["A red ring on a table."]], ["a red ring"], {}, False, meteor)
    assert found["bleu1"] == pytest.approx(math.exp(1 - 6 / 3), rel=1e-6)


@needs_java
def test_groups_recompute_bleu_and_meteor_and_average_the_rest(meteor):
    captions = [REFERENCES[0][0], "zebra xylophone", "umbrellas everywhere"]
    groups = {"target": [0], "retention": [1, 2]}
    found, per_image, _ = cap.score_captions(REFERENCES, captions, groups, False, meteor)
    assert found["target_n_images"] == 1 and found["retention_n_images"] == 2
    assert found["target_bleu4"] == pytest.approx(1.0, abs=1e-6) and found["target_meteor"] == pytest.approx(1.0)
    assert found["retention_bleu4"] == pytest.approx(0.0, abs=1e-6) and found["retention_meteor"] == 0.0
    assert found["target_cider"] == pytest.approx(per_image["cider"][0])  # document frequencies of the whole set
    assert found["cider"] == pytest.approx(np.mean(per_image["cider"]))
    assert found["rouge_l"] == pytest.approx(np.mean(per_image["rouge_l"]))


@needs_java
def test_captions_are_tokenized_one_per_line_whatever_they_hold(meteor):
    references = [["a red\nring."], ["A Dog, running!", "x"], ["the end"]]
    gts, res = cap.tokenize(references, ["", "A dog\r\nrunning", "..."])
    assert gts == {0: ["a red ring"], 1: ["a dog running", "x"], 2: ["the end"]}
    assert res == {0: [""], 1: ["a dog running"], 2: [""]}


# --- SPICE ------------------------------------------------------------------------------------


def test_spice_without_its_jars_is_a_note_after_one_short_download_attempt(monkeypatch, capsys):
    tried = []

    def failing(timeout):
        tried.append(timeout)
        raise OSError("Name or service not known")

    monkeypatch.setattr(cap, "fetch_corenlp", failing)
    assert cap.spice_missing_note() == cap.SPICE_MISSING
    assert tried == [cap.SPICE_DOWNLOAD_TIMEOUT] and cap.SPICE_DOWNLOAD_TIMEOUT <= 10
    assert "Name or service not known" in capsys.readouterr().err
    assert "stanford-corenlp-3.6.0.jar" in cap.SPICE_MISSING

    monkeypatch.setattr(cap, "missing_corenlp_jars", lambda: [])  # jars present: no download, no note
    monkeypatch.setattr(cap, "fetch_corenlp", lambda timeout: pytest.fail("downloaded with the jars present"))
    assert cap.spice_missing_note() is None


def test_missing_corenlp_jars_looks_where_pycocoevalcap_loads_them(monkeypatch, tmp_path):
    monkeypatch.setattr(cap.corenlp, "SPICEDIR", str(tmp_path))  # a stand-in pycocoevalcap/spice folder
    (tmp_path / "lib").mkdir()
    assert REAL_MISSING_JARS() == list(cap.CORENLP_JARS)
    (tmp_path / "lib" / cap.CORENLP_JARS[0]).write_bytes(b"")  # a half-finished download
    assert REAL_MISSING_JARS() == [cap.CORENLP_JARS[1]]


class FakeSpice:
    """pycocoevalcap's Spice interface; records the Java options its run would see."""

    seen: list[str | None] = []

    def compute_score(self, gts, res):
        FakeSpice.seen.append(os.environ.get("JDK_JAVA_OPTIONS"))
        per_image = [{"All": {"f": f, "pr": f, "re": f}} for f in (0.5, float("nan"), 0.25)][:len(gts)]
        return 0.0, per_image


@needs_java
def test_spice_scores_are_kept_with_java_options_set_only_for_its_run(monkeypatch, meteor):
    monkeypatch.setattr(cap, "Spice", FakeSpice)
    monkeypatch.delenv("JDK_JAVA_OPTIONS", raising=False)
    found, per_image, note = cap.score_captions(REFERENCES, ["a", "b", "c"], {"target": [0, 1]}, True, meteor)
    assert note is None and FakeSpice.seen[-1] == cap.SPICE_JAVA_OPTIONS and "JDK_JAVA_OPTIONS" not in os.environ
    assert "--add-opens=java.base/java.lang=ALL-UNNAMED" in cap.SPICE_JAVA_OPTIONS
    assert found["spice"] == pytest.approx(0.375)  # NaN (no tuples) left out of the mean
    assert found["target_spice"] == pytest.approx(0.5) and per_image["spice"][0] == 0.5


@needs_java
def test_a_failed_spice_run_is_a_note_not_a_zero(monkeypatch, meteor):
    class Failing:
        def compute_score(self, gts, res):
            raise subprocess.CalledProcessError(1, ["java", "-jar", "spice-1.0.jar"])

    monkeypatch.setattr(cap, "Spice", Failing)
    found, per_image, note = cap.score_captions(REFERENCES, ["a", "b", "c"], {"target": [0]}, True, meteor)
    assert note == cap.SPICE_FAILED.format("exit status 1")
    assert not any("spice" in key for key in found) and "spice" not in per_image


# --- bad input --------------------------------------------------------------------------------


def task_input(manifest: Manifest, outputs: Path | None = None, concepts=CONCEPTS) -> TaskInput:
    return TaskInput(manifest.name, manifest, DatasetParams(task="captioning"), list(concepts), ["{}"], [],
                     EvaluateParams(batch_size=2), outputs)


@pytest.mark.parametrize("refs", [(), ("  ",)])
def test_an_image_without_references_is_an_error_naming_it(tmp_path, refs):
    paths = write_images(tmp_path)
    records = (CaptionedImage(str(paths[0]), ("a red ring.",)), CaptionedImage(str(paths[1]), refs))
    with pytest.raises(DatasetError, match=f"image {paths[1]} has no reference captions"):
        cap.Captioning().evaluate(FakeCaptioner(), task_input(Manifest("caps", (), records), tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_no_java_on_path_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a folder without java
    records = tuple(CaptionedImage(str(p), ("a ring.",)) for p in write_images(tmp_path))
    with pytest.raises(KtpipeError, match="no `java` is on PATH"):
        cap.Captioning().evaluate(FakeCaptioner(), task_input(Manifest("caps", (), records)))


def test_a_model_that_cannot_caption_is_refused(tmp_path):
    from fakes import FakeCrossEncoder

    records = tuple(CaptionedImage(str(p), ("a ring.",)) for p in write_images(tmp_path))
    with pytest.raises(KtpipeError, match="captioning needs a model .*GeneratesCaptions"):
        cap.Captioning().evaluate(FakeCrossEncoder(), task_input(Manifest("caps", (), records)))


# --- end to end -------------------------------------------------------------------------------


def write_images(folder: Path, n: int = 2) -> list[Path]:
    """n noisy solid-color 16 px PNGs per concept, named <concept>_<i>.png."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (_, rgb) in COLORS.items():
        for i in range(n):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 10, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
            paths.append(folder / f"{name}_{i}.png")
    return paths


def references(name: str) -> tuple[str, ...]:
    color = COLORS[name][0]
    return (f"a {color} ring.", f"a {name}, a {color} ring on a gray background.")


class ColorCaptioner(FakeCaptioner):
    """Before transfer every image is 'a square'; a fine-tuned checkpoint names the image's color."""

    tuned = False

    def generate_captions(self, pixels, **settings):
        if not self.tuned:
            return ["a square"] * len(pixels)
        return [f"a {('red', 'green', 'blue')[int(p.mean((1, 2)).argmax())]} ring" for p in pixels]

    @classmethod
    def load(cls, name, pretrained=None, device="cpu"):
        model = cls()
        model.tuned = name.startswith(LOCAL_DIR)
        return model


def captioning_project(tmp_path: Path, monkeypatch, family: type) -> tuple[Params, Path]:
    """A captioned set of 6 images (2 per concept), the fake backend registered; params and the eval folder."""
    monkeypatch.setitem(models.BACKENDS, "fake_captioner", family.load)
    eval_dir = tmp_path / "eval"
    paths = write_images(eval_dir / "caps")
    records = tuple(CaptionedImage(str(p), references(p.stem.split("_")[0])) for p in paths)
    write_manifest(Manifest("caps", (), records), eval_dir / "caps.parquet")
    write_concept_files(CONCEPTS, tmp_path / "concepts")
    (tmp_path / "models" / "paper").mkdir(parents=True)
    raw = {"concepts": {"names": [c.name for c in CONCEPTS]},
           "model": {"backend": "fake_captioner", "name": "fake", "device": "cpu"},
           "recipes": {"paper": {}},
           "evaluate": {"batch_size": 4,
                        "sets": {"caps": {"task": "captioning", "format": "folder", "root": str(eval_dir / "caps")}}}}
    return validate(build_section(Params, raw)), eval_dir


def evaluate(params: Params, tmp_path: Path, eval_dir: Path, model: str) -> dict:
    return evaluation.run_evaluate(params, model, tmp_path / "models" / model, eval_dir, tmp_path / "concepts",
                                   tmp_path / "metrics" / f"{model}.json")


@needs_java
def test_run_evaluate_writes_metrics_notes_and_captions_beside_them(tmp_path, monkeypatch, shared_meteor):
    params, eval_dir = captioning_project(tmp_path, monkeypatch, FakeCaptioner)
    result = evaluate(params, tmp_path, eval_dir, "baseline")
    metrics = result["metrics"]["caps"]["captioning"]
    assert result["tasks"] == {"caps": "captioning"} and metrics["n_images"] == 6
    assert metrics["target_n_images"] == 4 and metrics["retention_n_images"] == 2
    assert metrics["concept_blicket_n_images"] == 2 and metrics["concept_dax_n_images"] == 2
    for key in ("bleu4", "meteor", "rouge_l", "cider", "target_cider", "retention_meteor", "concept_dax_bleu4"):
        assert 0 <= metrics[key] <= 10
    assert not any("spice" in key for key in metrics)  # unavailable: no key, never 0
    assert result["notes"] == {"caps": [cap.SPICE_MISSING]}
    assert set(result["summary"]["caps"]["captioning"]) == {"bleu4", "meteor", "cider", "target_meteor",
                                                            "target_cider", "retention_meteor", "retention_cider"}
    written = json.loads((tmp_path / "metrics" / "baseline.json").read_text())
    assert written["metrics"] == result["metrics"] and written["notes"] == result["notes"]

    rows = [json.loads(line) for line in (tmp_path / "metrics/baseline/caps.captions.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == [f"{c}_{i}.png" for c in COLORS for i in range(2)]
    assert rows[0]["references"] == list(references("blicket")) and rows[0]["caption"].startswith("a ")
    assert [(r["group"], r["concepts"]) for r in rows[::2]] == [("target", ["blicket"]), ("target", ["dax"]),
                                                                 ("retention", ["lantern"])]
    assert set(rows[0]) == {"path", "references", "caption", "group", "concepts", "bleu4", "meteor", "rouge_l", "cider"}
    assert metrics["cider"] == pytest.approx(np.mean([r["cider"] for r in rows]))
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == ["baseline", "baseline.json"]  # no temp left


def test_bad_input_stops_the_stage_with_no_outputs(tmp_path, monkeypatch):
    """Both checks come before any Java runs: this test needs none."""
    params, eval_dir = captioning_project(tmp_path, monkeypatch, FakeCaptioner)
    params_file = tmp_path / "params.yaml"
    raw = {"concepts": {"names": [c.name for c in CONCEPTS]}, "model": dataclasses.asdict(params.model),
           "recipes": {"paper": {}}, "evaluate": {"sets": {
               "caps": {"task": "captioning", "format": "folder", "root": str(eval_dir / "caps")}}}}
    params_file.write_text(json.dumps(raw))  # JSON is YAML 1.2
    args = ["evaluate", "--params", str(params_file), "baseline", str(tmp_path / "models/baseline"), str(eval_dir),
            str(tmp_path / "concepts"), str(tmp_path / "metrics/baseline.json")]

    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(tmp_path / "models"))  # no java there
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "`java`" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "metrics").exists() or not any((tmp_path / "metrics").iterdir())

    monkeypatch.setenv("PATH", path)
    blank = Manifest("caps", (), (CaptionedImage(str(eval_dir / "caps/blicket_0.png"), (" ",)),))
    write_manifest(blank, eval_dir / "caps.parquet")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "blicket_0.png has no reference captions" in result.output
    assert not (tmp_path / "metrics").exists() or not any((tmp_path / "metrics").iterdir())


@needs_java
def test_report_shows_the_table_the_note_and_the_most_improved_captions(tmp_path, monkeypatch, shared_meteor):
    params, eval_dir = captioning_project(tmp_path, monkeypatch, ColorCaptioner)
    results = {model: evaluate(params, tmp_path, eval_dir, model) for model in ("baseline", "paper")}
    concepts = read_concepts(tmp_path / "concepts", params.concepts.names)
    lines = set_section(params, results, concepts, "caps", tmp_path / "metrics", tmp_path / "reports")
    text = "\n".join(lines)
    assert lines[0] == "## Set `caps` (captioning, folder)"
    assert "| Images | Model | BLEU@4 | METEOR | ROUGE-L | CIDEr | SPICE |" in lines
    labels = [line.split(" | ")[:2] for line in lines if line.startswith("| ") and line.endswith(" | n/a |")]
    assert labels == [[f"| {group}", model] for group in ("all (6)", "target (4)", "blicket (2)", "dax (2)",
                                                          "retention (2)") for model in ("baseline", "paper")]
    paper_all = results["paper"]["metrics"]["caps"]["captioning"]
    assert f"| all (6) | paper | {100 * paper_all['bleu4']:.1f} | {100 * paper_all['meteor']:.1f} |" in text
    assert f"**Note** (baseline, paper): {cap.SPICE_MISSING}" in lines
    assert "Captions whose METEOR rose most from `baseline` to `paper` (of 6 images; METEOR x100):" in lines
    examples = [line for line in lines if line.startswith("| ![")]
    assert len(examples) == cap.EXAMPLES  # every image rose; the five that rose most
    rows = {model: cap.read_rows(tmp_path / "metrics" / model / "caps.captions.jsonl") for model in results}
    rises = sorted((a["meteor"] - b["meteor"], -i) for i, (b, a) in enumerate(zip(rows["baseline"], rows["paper"])))
    top = -rises[-1][1]  # the image that rose most (the first of equals)
    before, after = rows["baseline"][top]["meteor"], rows["paper"][top]["meteor"]
    name = Path(rows["paper"][top]["path"]).stem
    assert (tmp_path / "reports/figures/captioning" / f"caps_{name}.png").is_file()  # copied beside the report
    assert examples[0] == (f"| ![{name}](figures/captioning/caps_{name}.png) | {name.split('_')[0]} | "
                           f"{rows['paper'][top]['references'][0]} | a square | {rows['paper'][top]['caption']} | "
                           f"{100 * before:.1f} -> {100 * after:.1f} |")


# --- MSCOCO's Karpathy split file -------------------------------------------------------------


def test_karpathy_reads_mscoco_dataset_coco_json(tmp_path):
    """dataset_coco.json: images under <root>/<filepath>/<filename>, splits train/restval/val/test."""
    entries = []
    for i, (folder, split) in enumerate([("val2014", "test"), ("train2014", "restval"), ("val2014", "val"),
                                         ("val2014", "test")]):
        name = f"COCO_{folder}_{i:012d}.jpg"
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / folder / name)
        sentences = [{"tokens": ["a", "man"], "raw": f"A man riding a moped {i}. ", "imgid": i, "sentid": 10 * i},
                     {"tokens": ["a", "dog"], "raw": "a dog", "imgid": i, "sentid": 10 * i + 1}]
        entries.append({"filepath": folder, "sentids": [10 * i, 10 * i + 1], "filename": name, "imgid": i,
                        "split": split, "sentences": sentences, "cocoid": 391895 + i})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    spec = DatasetParams(task="captioning", format="karpathy", root=str(tmp_path), labels="dataset_coco.json")
    manifest = load_dataset("coco", spec, seed=0)
    assert manifest.kind == "captioned"
    assert [r.path for r in manifest.records] == [str(tmp_path / "val2014" / e["filename"]) for e in entries[::3]]
    assert manifest.records[0].captions == ("A man riding a moped 0.", "a dog")
    restval = load_dataset("coco", DatasetParams(task="captioning", format="karpathy", root=str(tmp_path),
                                                 labels="dataset_coco.json", split="restval"), seed=0)
    assert restval.paths == (str(tmp_path / "train2014" / entries[1]["filename"]),)
