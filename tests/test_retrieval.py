"""Retrieval: Recall@K against a brute-force reference, repeated captions, concept groups, the
dual-encoder and cross-encoder score matrices, the caption loaders (Karpathy split files, CSV)
and the demo world's captioned renders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fakes import FakeCrossEncoder
from ktpipe.concepts import ConceptText
from ktpipe.datasets import CaptionedImage, Manifest, load_dataset
from ktpipe.datasets.selection import take_subset
from ktpipe.eval import TASKS
from ktpipe.eval.base import TaskInput
from ktpipe.eval.retrieval import caption_index, concept_groups, recall_at_k, retrieval_metrics
from ktpipe.images import DatasetError
from ktpipe.models import OpenClipModel
from ktpipe.params import DatasetParams, EvaluateParams

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
CONCEPTS = [ConceptText("blicket", "a striped orange ring", "novel"), ConceptText("halo", "an outlined ring", "known")]


def brute_force(scores: np.ndarray, positives: np.ndarray, k: int) -> tuple[float, float]:
    """(text->image, image->text) Recall@k by sorting each query's candidates one by one."""
    t2i = [any(positives[i, t] for i in np.argsort(-scores[:, t], kind="stable")[:k]) for t in range(scores.shape[1])]
    i2t = [any(positives[i, t] for t in np.argsort(-scores[i], kind="stable")[:k]) for i in range(scores.shape[0])]
    return float(np.mean(t2i)), float(np.mean(i2t))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_images, n_captions = 12, 40
    scores = rng.normal(size=(n_images, n_captions)).astype(np.float32)
    positives = np.zeros((n_images, n_captions), dtype=bool)
    positives[rng.integers(n_images, size=n_captions), np.arange(n_captions)] = True  # one image per caption
    positives[rng.integers(n_images, size=8), rng.integers(n_captions, size=8)] = True  # some describe two
    metrics = retrieval_metrics(torch.from_numpy(scores), torch.from_numpy(positives))
    for k in (1, 5, 10):
        t2i, i2t = brute_force(scores, positives, k)
        assert metrics[f"t2i_r{k}"] == pytest.approx(t2i) and metrics[f"i2t_r{k}"] == pytest.approx(i2t)
    assert 0 < metrics["t2i_r1"] < metrics["t2i_r10"] <= 1  # the random scores leave room both ways


def test_recall_counts_every_candidate_when_k_exceeds_them():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    positives = torch.tensor([[True, False], [False, True]])
    assert recall_at_k(scores, positives, 1).tolist() == [0.0, 0.0]
    assert recall_at_k(scores, positives, 10).tolist() == [1.0, 1.0]


def test_repeated_captions_are_one_query_with_every_image_they_describe():
    manifest = Manifest("s", (), (CaptionedImage("a.png", ("a blicket.", "red")), CaptionedImage("b.png", ("a blicket.",))))
    captions, positives = caption_index(manifest)
    assert captions == ["a blicket.", "red"]
    assert positives.tolist() == [[True, True], [True, False]]
    scores = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # the query 'a blicket.' ranks b first: still a hit
    metrics = retrieval_metrics(scores, positives)
    assert metrics["t2i_r1"] == 1.0 and metrics["i2t_r1"] == 1.0


def test_concept_groups_match_whole_names():
    captions = ["a blicket on a gray background.", "a halo.", "a blickets shop.", "a red thing."]
    groups = concept_groups(captions, CONCEPTS)
    assert groups["target"].tolist() == [True, False, False, False]
    assert groups["retention"].tolist() == [False, True, False, False]
    scores = torch.eye(4)[:, :4]
    positives = torch.eye(4, dtype=torch.bool)
    metrics = retrieval_metrics(scores, positives, groups)
    assert metrics["target_t2i_r1"] == 1.0 and metrics["retention_i2t_r1"] == 1.0


def write_captioned(folder: Path, n: int = 6) -> Manifest:
    """n small images of distinct colors, each with two captions naming a concept."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.new("RGB", (16, 16), (40 * i, 255 - 40 * i, 90)).save(path)
        name = "blicket" if i % 2 else "halo"
        records.append(CaptionedImage(str(path), (f"a {name} number {i}.", f"picture {i} of a {name}.")))
    return Manifest("pairs", (), tuple(records))


def task_input(manifest: Manifest) -> TaskInput:
    spec = DatasetParams(task="retrieval", format="captions")
    return TaskInput("pairs", manifest, spec, CONCEPTS, ["a photo of a {}."], [], EvaluateParams(batch_size=4))


def test_dual_encoder_scores_are_cosine_similarities(tmp_path):
    manifest = write_captioned(tmp_path / "images")
    model = OpenClipModel.from_config(TINY)
    metrics = TASKS["retrieval"].evaluate(model, task_input(manifest), progress=False)
    captions, positives = caption_index(manifest)
    with torch.no_grad():
        pixels = torch.stack([model.preprocess(Image.open(p)) for p in manifest.paths])
        scores = model.encode_images(pixels) @ torch.cat([model.encode_texts([c]) for c in captions]).T
    expected = retrieval_metrics(scores, positives, concept_groups(captions, CONCEPTS))
    assert metrics == pytest.approx(expected)
    assert metrics["n_images"] == 6 and metrics["n_captions"] == 12 and "target_t2i_r5" in metrics


def test_cross_encoder_scores_every_pair(tmp_path):
    manifest = write_captioned(tmp_path / "images")
    model = FakeCrossEncoder()
    metrics = TASKS["retrieval"].evaluate(model, task_input(manifest), progress=False)
    captions, positives = caption_index(manifest)
    with torch.no_grad():
        pixels = torch.stack([model.preprocess(Image.open(p)) for p in manifest.paths])
        scores = torch.stack([model.score_pairs(pixels, [c] * len(pixels)) for c in captions], dim=1)
    expected = retrieval_metrics(scores, positives, concept_groups(captions, CONCEPTS))
    assert metrics == pytest.approx({**expected, "pairs_scored": len(manifest) * len(captions)})


class CuttingCrossEncoder(FakeCrossEncoder):
    """A cross-encoder that reads at most 12 characters, as ViLT reads at most 40 tokens (CutsTexts)."""

    def fit_texts(self, texts: list[str]) -> list[str]:
        return [text[:12] for text in texts]


def test_a_cross_encoder_that_cuts_texts_scores_cut_captions_and_counts_them(tmp_path):
    from ktpipe.report import truncation_note

    manifest = write_captioned(tmp_path / "images")
    model = CuttingCrossEncoder()
    metrics = TASKS["retrieval"].evaluate(model, task_input(manifest), progress=False)
    captions, positives = caption_index(manifest)
    with torch.no_grad():
        pixels = torch.stack([model.preprocess(Image.open(p)) for p in manifest.paths])
        scores = torch.stack([model.score_pairs(pixels, [c[:12]] * len(pixels)) for c in captions], dim=1)
    expected = retrieval_metrics(scores, positives, concept_groups(captions, CONCEPTS))  # groups: the whole captions
    cut = sum(len(c) > 12 for c in captions)
    assert cut == 12 and metrics == pytest.approx({**expected, "pairs_scored": 72, "texts_truncated": cut})
    note = truncation_note({"baseline": metrics, "paper": {**metrics, "texts_truncated": 0.0}})
    assert note == ["**Note**: texts over the model's text limit, cut to it as the model's own library does: "
                    "baseline 12.", ""]
    assert truncation_note({"baseline": {"t2i_r1": 1.0}}) == []


def test_a_model_without_scores_is_a_clear_error(tmp_path):
    manifest = write_captioned(tmp_path / "images")

    class Captioner:
        module = torch.nn.Linear(1, 1)

        def preprocess(self, image):
            return torch.zeros(3, 16, 16)

    with pytest.raises(Exception, match="retrieval"):
        TASKS["retrieval"].evaluate(Captioner(), task_input(manifest), progress=False)


def test_report_table_lists_models_and_groups():
    metrics = {f"{p}{d}_r{k}": 0.5 for p in ("", "target_") for d in ("t2i", "i2t") for k in (1, 5, 10)}
    lines = TASKS["retrieval"].report_table({"baseline": metrics, "paper": metrics}, CONCEPTS)
    assert lines[0].startswith("| Model | Queries | Text->image R@1")
    assert [line.split(" | ")[:2] for line in lines[2:]] == [["| baseline", "all"], ["| baseline", "target"],
                                                             ["| paper", "all"], ["| paper", "target"]]
    assert lines[2].endswith("| 50.0% | 50.0% | 50.0% | 50.0% | 50.0% | 50.0% |")


# --- loaders ---------------------------------------------------------------------------------


def karpathy_layout(root: Path, entries: list[dict]) -> Path:
    for e in entries:
        path = root / e.get("filepath", "") / e["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(path)
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return root


def entry(name: str, split: str, captions: list[str], filepath: str | None = None) -> dict:
    e = {"filename": name, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
    if filepath:
        e["filepath"] = filepath
    return e


def karpathy_spec(root: Path, **kw) -> DatasetParams:
    return DatasetParams(task="retrieval", format="karpathy", root=str(root), labels="dataset_flickr30k.json", **kw)


def test_karpathy_test_split_with_captions(tmp_path):
    root = karpathy_layout(tmp_path, [entry("1.jpg", "train", ["x"]), entry("2.jpg", "test", ["a dog.", " a cat "]),
                                      entry("3.jpg", "test", ["a man."], filepath="val2014")])
    manifest = load_dataset("flickr", karpathy_spec(root), seed=0)
    assert manifest.kind == "captioned" and len(manifest) == 2
    assert manifest.records[0] == CaptionedImage(str(root / "2.jpg"), ("a dog.", "a cat"))
    assert manifest.records[1].path == str(root / "val2014" / "3.jpg")
    assert len(load_dataset("flickr", karpathy_spec(root, split="train"), seed=0)) == 1


@pytest.mark.parametrize("entries, words", [
    ([entry("1.jpg", "train", ["x"])], "no 'test' split; its splits: ['train']"),
    ([entry("1.jpg", "test", [])], "have no captions, first: ['1.jpg']"),
    ([{"split": "test"}], "image entry 0 lacks 'filename'"),
])
def test_karpathy_errors_name_the_file(tmp_path, entries, words):
    root = karpathy_layout(tmp_path, [e for e in entries if "filename" in e])
    if not any("filename" in e for e in entries):
        (root / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    with pytest.raises(DatasetError, match="dataset_flickr30k.json") as err:
        load_dataset("flickr", karpathy_spec(root), seed=0)
    assert words in str(err.value)


def test_karpathy_missing_image_and_bad_json(tmp_path):
    root = karpathy_layout(tmp_path, [entry("1.jpg", "test", ["a dog."])])
    (root / "1.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) listed in .*dataset_flickr30k.json not found"):
        load_dataset("flickr", karpathy_spec(root), seed=0)
    (root / "dataset_flickr30k.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read Karpathy split file"):
        load_dataset("flickr", karpathy_spec(root), seed=0)


def test_caption_file_groups_rows_by_image(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "captions.csv").write_text("path,caption\nb.png,first b\na.png,only a\nb.png,second b\n")
    spec = DatasetParams(task="retrieval", format="captions", labels=str(tmp_path / "captions.csv"))
    manifest = load_dataset("pairs", spec, seed=0)
    assert [(Path(r.path).name, r.captions) for r in manifest.records] == [("b.png", ("first b", "second b")),
                                                                          ("a.png", ("only a",))]
    (tmp_path / "captions.csv").write_text("path,caption\na.png,\n")
    with pytest.raises(DatasetError, match=r"captions.csv: empty path or caption in data row\(s\) \[1\]"):
        load_dataset("pairs", spec, seed=0)
    (tmp_path / "captions.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['caption'\]"):
        load_dataset("pairs", spec, seed=0)


def test_captioned_subset_is_seeded_and_nested_and_classes_are_refused(tmp_path):
    manifest = write_captioned(tmp_path / "images", n=10)
    small, large = take_subset(manifest, 3, seed=4), take_subset(manifest, 6, seed=4)
    assert len(small) == 3 and set(small.paths) < set(large.paths)
    assert take_subset(manifest, 3, seed=4) == small and take_subset(manifest, 3, seed=5) != small
    (tmp_path / "captions.csv").write_text("path,caption\n" + "".join(f"{p},x\n" for p in manifest.paths))
    spec = DatasetParams(task="retrieval", format="captions", labels=str(tmp_path / "captions.csv"), classes=("x",))
    with pytest.raises(DatasetError, match="holds captioned images, which have no classes to keep"):
        load_dataset("pairs", spec, seed=0)


# --- the demo world's captioned renders ------------------------------------------------------


def test_demo_retrieval_set_is_the_test_renders_captioned(tiny_project):
    from conftest import DEMO_CONCEPTS_FILE, write_params
    from ktpipe.concepts import load_concepts_file, world_concepts
    from ktpipe.datasets import load_eval_set, run_data
    from ktpipe.params import load_params

    write_demo_sets = {"test": {"format": "demo", "split": "test"},
                       "test_captions": {"task": "retrieval", "format": "demo", "split": "test"}}
    write_params(tiny_project, evaluate={"sets": write_demo_sets})
    params = load_params(tiny_project / "params.yaml")
    world_path = tiny_project / "world.json"
    world_path.write_text(json.dumps(world_concepts(load_concepts_file(DEMO_CONCEPTS_FILE))))
    run_data(params, tiny_project / "eval", world_path)
    labeled, captioned = (load_eval_set(tiny_project / "eval", name) for name in ("test", "test_captions"))
    assert captioned.kind == "captioned" and len(captioned) == len(labeled) == 2 * 11
    renders = {Path(r.path).relative_to(tiny_project / "eval" / "test").as_posix(): r for r in labeled.records}
    for record in captioned.records:
        image = renders[Path(record.path).relative_to(tiny_project / "eval" / "test_captions").as_posix()]
        concept = labeled.classes[image.label]
        assert Path(record.path).read_bytes() == Path(image.path).read_bytes()  # the same renders
        assert len(record.captions) == 3 and all(concept in caption for caption in record.captions)
        assert record.captions[0].endswith(" background.")
    summary = json.loads((tiny_project / "eval" / "sets.json").read_text())["test_captions"]
    assert summary["kind"] == "captioned" and summary["n_images"] == 22 and "per_class" not in summary
