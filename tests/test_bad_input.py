"""Bad input to a stage command: exit status 2, one `ktpipe: error:` line naming the problem,
no traceback, and no output (or a stale output left exactly as it was, never half-written).

The stage commands run in-process through the `ktpipe` click group (conftest `run_stage_here`:
same code, same exit status and stderr, without a 5-10 s interpreter start-up per run). One test,
`test_invert_stage_without_concept_file`, runs its stage as a real subprocess (`run_stage`,
`python -m ktpipe invert ...`), so the interpreter's own exit path is checked here too;
tests/test_stages.py runs every stage command as a subprocess. So does
`test_evaluate_stage_with_a_sam_hub_id_not_in_the_cache`: huggingface_hub reads HF_HUB_OFFLINE
at import, so only a fresh interpreter is offline.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ruamel.yaml import YAML

from conftest import DEMO_CONCEPTS, read_params, run_stage, run_stage_here, write_params
from ktpipe.describe import run_concepts
from ktpipe.params import ConceptsParams

CONCEPTS_ARGS = ("captions/demo.yaml", "captions/generated.yaml", "data/concepts", "data/world.json", "data/known.json")
INVERT_ARGS = ("data/concepts/blicket.json", "data/inverted/blicket", "--timing", "metrics/invert/blicket.json")
FINETUNE_ARGS = ("paper", "data/concepts", "data/inverted", "models/paper", "metrics/finetune/paper.json")


def assert_user_error(result, *needles: str) -> None:
    """Exit status 2 with a `ktpipe: error:` message that contains every needle."""
    detail = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, detail
    assert "Traceback" not in result.stderr, detail
    # progress bars may precede the message on stderr; it starts a line and comes once
    assert result.stderr.count("ktpipe: error: ") == 1, detail
    message = result.stderr[result.stderr.index("ktpipe: error: "):]
    assert result.stderr.startswith(message) or f"\n{message}" in result.stderr, detail
    for needle in needles:
        assert needle in message, f"{needle!r} not in message\n{detail}"


def assert_absent(project: Path, *outputs: str) -> None:
    """The outputs do not exist and no temporary file or folder is left next to them."""
    for out in outputs:
        path = project / out
        assert not path.exists(), f"{out} exists after a failed run"
        if path.parent.is_dir():
            leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}")]
            assert not leftovers, f"temporary files left: {leftovers}"


def snapshot(folder: Path) -> dict[str, bytes]:
    """relative path -> content of every file under folder (hidden files included)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_concepts(project: Path) -> None:
    """data/concepts/*.json, as the concepts stage writes them (in-process: no torch needed)."""
    run_concepts(project / "captions/demo.yaml", project / "captions/generated.yaml",
                 ConceptsParams(names=tuple(DEMO_CONCEPTS)), project / "data/concepts",
                 world_path=project / "data/world.json")


def write_image_root(root: Path, per_class: int = 1, size: int = 16) -> None:
    """root/{val,test}/<concept>/NNNN.png with random pixels."""
    rng = np.random.default_rng(0)
    for split in ("val", "test"):
        for name in DEMO_CONCEPTS:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:04d}.png")


def test_missing_argument_prints_usage(tiny_project):
    result = run_stage_here(tiny_project, "finetune")  # paths default to dvc.yaml's; the recipe does not
    assert result.returncode == 2 and result.stderr.startswith("Usage: ktpipe finetune ")
    assert "RECIPE [CONCEPTS_DIR] [INVERTED_DIR] [OUT_DIR] [LOG_PATH]" in " ".join(result.stderr.split())
    assert "Missing argument 'RECIPE'" in result.stderr and "Traceback" not in result.stderr


def test_extra_argument_prints_usage(tiny_project):
    result = run_stage_here(tiny_project, "captions", *["x.yaml"] * 6)
    assert result.returncode == 2 and result.stderr.startswith("Usage: ktpipe captions ")
    assert "unexpected extra argument" in result.stderr and "Traceback" not in result.stderr


# --- concepts stage -------------------------------------------------------------------------


def undescribed_concept(project):
    write_params(project, concepts={"names": ["blicket", "moongate", "dax"]})


def malformed_yaml(project):
    (project / "captions/demo.yaml").write_text("concepts:\n  blicket: {description: [unclosed\n")


def concept_without_description(project):
    (project / "captions/demo.yaml").write_text(
        "concepts:\n  blicket: {description: a striped orange ring}\n  dax: {role: novel}\n")
    write_params(project, concepts={"names": ["blicket", "dax"]})


def unknown_params_key(project):
    write_params(project, invert={"stepz": 3})


def unknown_top_level_key(project):
    write_params(project, sede=1)


@pytest.mark.parametrize("setup, args, needles", [
    (undescribed_concept, CONCEPTS_ARGS, ["moongate", "no description"]),
    (None, ("captions/nope.yaml", "captions/generated.yaml", "data/concepts", "data/world.json", "data/known.json"),
     ["concepts file not found", "captions/nope.yaml"]),
    (malformed_yaml, CONCEPTS_ARGS, ["cannot parse concepts file", "captions/demo.yaml"]),
    (concept_without_description, CONCEPTS_ARGS, ["'dax'", "has no description"]),
    (unknown_params_key, CONCEPTS_ARGS, ["unknown params key", "stepz", "section 'invert'"]),
    (unknown_top_level_key, CONCEPTS_ARGS, ["unknown params key", "sede"]),
], ids=["undescribed-concept", "missing-file", "malformed-yaml", "no-description", "unknown-key", "unknown-top-key"])
def test_concepts_stage_rejects(tiny_project, setup, args, needles):
    if setup:
        setup(tiny_project)
    assert_user_error(run_stage_here(tiny_project, "captions", *args), *needles)
    assert_absent(tiny_project, "data/concepts")


def test_failed_concepts_run_leaves_the_previous_output_intact(tiny_project):
    assert run_stage_here(tiny_project, "captions", *CONCEPTS_ARGS).returncode == 0
    before = snapshot(tiny_project / "data")
    assert len(before) == len(DEMO_CONCEPTS) + 2  # one file per concept, world.json and known.json
    text = (tiny_project / "captions/demo.yaml").read_text()
    (tiny_project / "captions/demo.yaml").write_text(text.replace("description: an outlined pink triangle, ", ""))
    assert_user_error(run_stage_here(tiny_project, "captions", *CONCEPTS_ARGS), "'dax'", "has no description")
    assert snapshot(tiny_project / "data") == before  # untouched, and no temporary folder beside it


# --- model loading (invert stage) -----------------------------------------------------------


@pytest.mark.parametrize("model, needles", [
    ({"name": "ViT-Nope-99"}, ["unknown open_clip model name", "'ViT-Nope-99'"]),
    ({"backend": "tensorflow"}, ["unknown model backend", "'tensorflow'", "open_clip"]),
    ({"name": "ViT-B-32", "pretrained": "no-such-tag"}, ["'no-such-tag'", "neither a known tag"]),
    ({"backend": "demo", "name": "ktpipe-demo", "pretrained": "models/nowhere"},
     ["demo checkpoint not found", "models/nowhere"]),
], ids=["unknown-name", "unknown-backend", "unknown-pretrained-tag", "missing-demo-checkpoint"])
def test_invert_stage_rejects_model(tiny_project, model, needles):
    write_concepts(tiny_project)
    write_params(tiny_project, model=model)
    assert_user_error(run_stage_here(tiny_project, "invert", *INVERT_ARGS), *needles)
    assert_absent(tiny_project, "data/inverted/blicket")


def test_invert_stage_without_concept_file(tiny_project):
    assert_user_error(run_stage(tiny_project, "invert", *INVERT_ARGS),
                      "concept file not found", "data/concepts/blicket.json")
    assert_absent(tiny_project, "data/inverted/blicket")


# --- finetune stage -------------------------------------------------------------------------


@pytest.mark.parametrize("lr, needles", [
    (-1, ["params key 'lr' must be a positive number", "-1"]),
    (0, ["params key 'lr' must be a positive number", "0"]),
    ("abc", ["params key 'lr' must be a number", "'abc'"]),
], ids=["negative", "zero", "string"])
def test_finetune_stage_rejects_lr(tiny_project, lr, needles):
    write_concepts(tiny_project)
    write_params(tiny_project, lr=lr)
    assert_user_error(run_stage_here(tiny_project, "finetune", *FINETUNE_ARGS), *needles)
    assert_absent(tiny_project, "models/paper", "metrics/finetune/paper.json")


# --- data and evaluate stages -------------------------------------------------------------


def use_image_root(project: Path, root: Path) -> None:
    """Point the val and test evaluation sets at root/{val,test}/<concept>/ folders."""
    sets = {split: {"format": "folder", "root": str(root / split)} for split in ("val", "test")}
    write_params(project, evaluate={"sets": sets})


def prepare_eval(project: Path) -> None:
    """Concept files, a random-pixel image root, and the data stage's manifests."""
    write_concepts(project)
    write_image_root(project / "images")
    use_image_root(project, project / "images")
    result = run_stage_here(project, "data", "data/world.json", "data/eval")
    assert result.returncode == 0, result.stderr


def test_data_stage_with_empty_image_folders(tiny_project):
    for split in ("val", "test"):
        for name in DEMO_CONCEPTS:
            (tiny_project / "images" / split / name).mkdir(parents=True)
    use_image_root(tiny_project, tiny_project / "images")
    assert_user_error(run_stage_here(tiny_project, "data", "data/world.json", "data/eval"), "images/", "empty")
    assert_absent(tiny_project, "data/eval")


def test_data_stage_with_missing_root(tiny_project):
    use_image_root(tiny_project, tiny_project / "nowhere")
    assert_user_error(run_stage_here(tiny_project, "data", "data/world.json", "data/eval"), "nowhere/")
    assert_absent(tiny_project, "data/eval")


def test_data_stage_with_unset_environment_variable(tiny_project):
    write_concepts(tiny_project)  # the demo `test` set stays in params
    write_params(tiny_project, evaluate={"sets": {"val": {"format": "folder", "root": "$KTPIPE_NO_SUCH_VAR/val"}}})
    assert_user_error(run_stage_here(tiny_project, "data", "data/world.json", "data/eval"), "KTPIPE_NO_SUCH_VAR", "evaluate.sets.val.root")
    assert_absent(tiny_project, "data/eval")


def test_evaluate_stage_with_missing_checkpoint(tiny_project):
    prepare_eval(tiny_project)
    result = run_stage_here(tiny_project, "evaluate", "paper", "models/nope", "data/eval", "data/concepts",
                            "metrics/eval/paper.json")
    assert_user_error(result, "checkpoint folder not found", "models/nope")
    assert_absent(tiny_project, "metrics/eval/paper.json")


def test_evaluate_stage_without_the_data_stage(tiny_project):
    write_concepts(tiny_project)
    result = run_stage_here(tiny_project, "evaluate", "baseline", "models/baseline", "data/eval", "data/concepts",
                            "metrics/eval/baseline.json")
    assert_user_error(result, "evaluation set 'test' not found", "dvc repro data")
    assert_absent(tiny_project, "metrics/eval/baseline.json")


def test_evaluate_stage_with_corrupt_png(tiny_project):
    prepare_eval(tiny_project)
    (tiny_project / "images/val/dax/0000.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    result = run_stage_here(tiny_project, "evaluate", "baseline", "models/baseline", "data/eval", "data/concepts",
                            "metrics/eval/baseline.json")
    assert_user_error(result, "cannot read image", "images/val/dax/0000.png")
    assert_absent(tiny_project, "metrics/eval/baseline.json")


def test_failed_evaluate_run_leaves_the_previous_result_intact(tiny_project):
    """The test set fails after the val set was scored: the old JSON must survive as it was."""
    prepare_eval(tiny_project)
    args = ("baseline", "models/baseline", "data/eval", "data/concepts", "metrics/eval/baseline.json")
    assert run_stage_here(tiny_project, "evaluate", *args).returncode == 0
    before = snapshot(tiny_project / "metrics")
    assert list(before) == ["eval/baseline.json"]
    (tiny_project / "images/test/wug/0000.png").write_bytes(b"garbage")
    assert_user_error(run_stage_here(tiny_project, "evaluate", *args), "cannot read image", "test/wug/0000.png")
    assert snapshot(tiny_project / "metrics") == before


# --- retrieval with a cross-encoder (evaluate stage) ----------------------------------------


def captioned_demo_set(project: Path, rerank: dict) -> None:
    """A retrieval set of the demo world's test renders (2 per concept, 3 captions each), reranked."""
    write_concepts(project)
    write_params(project, evaluate={"sets": {
        "val": {"format": "demo", "split": "val"},
        "test": {"task": "retrieval", "format": "demo", "split": "test", "rerank": rerank}}})
    result = run_stage_here(project, "data", "data/world.json", "data/eval")
    assert result.returncode == 0, result.stderr


def test_evaluate_stage_rejects_a_rerank_k_larger_than_the_set(tiny_project, tiny_checkpoint, tmp_path):
    from archs import write_vilt

    vilt = write_vilt(tmp_path / "vilt", head="itm")
    proposer = {"backend": "open_clip", "name": f"local-dir:{tiny_checkpoint}", "device": "cpu"}
    captioned_demo_set(tiny_project, {"k": 1000, "model": proposer})
    write_params(tiny_project, model={"backend": "vilt", "name": f"local-dir:{vilt}"})
    result = run_stage_here(tiny_project, "evaluate", "baseline", "models/baseline", "data/eval", "data/concepts",
                            "metrics/eval/baseline.json")
    assert_user_error(result, "'evaluate.sets.test.rerank.k' is 1000", "k must lie in [1, ")
    assert_absent(tiny_project, "metrics/eval/baseline.json")


def test_evaluate_stage_rejects_a_rerank_of_a_dual_encoder(tiny_project, tiny_checkpoint):
    proposer = {"backend": "open_clip", "name": f"local-dir:{tiny_checkpoint}", "device": "cpu"}
    captioned_demo_set(tiny_project, {"k": 2, "model": proposer})
    result = run_stage_here(tiny_project, "evaluate", "baseline", "models/baseline", "data/eval", "data/concepts",
                            "metrics/eval/baseline.json")
    assert_user_error(result, "'evaluate.sets.test.rerank'", "dual encoder")
    assert_absent(tiny_project, "metrics/eval/baseline.json")


def test_finetune_stage_rejects_a_dual_encoder_objective_for_vilt(tiny_project, tmp_path):
    from archs import write_vilt

    write_concepts(tiny_project)
    vilt = write_vilt(tmp_path / "vilt", head="itm")
    write_params(tiny_project, model={"backend": "vilt", "name": f"local-dir:{vilt}"},
                 finetune={"loss": "authors", "temperature": 0.07})
    result = run_stage_here(tiny_project, "finetune", *FINETUNE_ARGS)
    assert_user_error(result, "recipe 'paper'", "finetune.loss 'authors'", "EmbedsImages")  # before any image is read
    assert_absent(tiny_project, "models/paper", "metrics/finetune/paper.json")


# --- segmentation sets (data and evaluate stages) -------------------------------------------

EVAL_ARGS = ("baseline", "models/baseline", "data/eval", "data/concepts", "metrics/eval/baseline.json")
EVAL_OUTPUTS = ("metrics/eval/baseline.json", "metrics/eval/baseline")  # the metrics and the per-image files


def write_masked_pair(root: Path, stem: str, mask: np.ndarray | None = None) -> None:
    """root/images/<stem>.png (16x16 noise) and root/masks/<stem>.png (`mask`, default a 0/255 block)."""
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
    if mask is None:
        mask = np.zeros((16, 16), dtype=np.uint8)
        mask[4:12, 4:10] = 255
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def segmentation_set(project: Path, spec: dict | None = None, **segmentation) -> Path:
    """Make `seg` (images a and b, flat, class blicket, `spec` merged in) the only evaluation set,
    with M2IB cut to one step of one copy on the tiny CLIP's one vision block; returns its root."""
    root = project / "seg"
    for stem in ("a", "b"):
        write_masked_pair(root, stem)
    raw = read_params(project)
    raw["evaluate"]["sets"] = {"seg": {"task": "segmentation", "format": "masks", "root": str(root),
                                       "classes": ["blicket"], **(spec or {})}}
    raw["evaluate"]["segmentation"] = {"layer": 0, "steps": 1, "noise_samples": 1, **segmentation}
    raw["report"] = {"target_set": "seg", "retention_set": "seg"}
    with (project / "params.yaml").open("w") as fh:
        YAML(typ="safe", pure=True).dump(raw, fh)
    return root


def without_mask(root: Path) -> None:
    (root / "masks/b.png").unlink()


def mask_of_another_size(root: Path) -> None:
    Image.fromarray(np.zeros((12, 16), dtype=np.uint8)).save(root / "masks/b.png")


def three_valued_mask(root: Path) -> None:
    pixels = np.zeros((16, 16), dtype=np.uint8)
    pixels[4:8], pixels[8:12] = 128, 255
    Image.fromarray(pixels).save(root / "masks/b.png")


@pytest.mark.parametrize("spec, segmentation, damage, needles", [
    ({}, {}, without_mask, ["1 image(s) have no mask", "seg/images/b.png"]),
    ({}, {}, mask_of_another_size, ["seg/masks/b.png is 16x12 pixels but its image is 16x16"]),
    ({}, {}, three_valued_mask, ["seg/masks/b.png is not binary", "3 pixel values (0, 128, 255)"]),
    ({"prompt": "  "}, {}, None, ["params key 'evaluate.sets.seg.prompt' is empty"]),
    ({"spacing": [1.0, 0.0]}, {}, None, ["params key 'evaluate.sets.seg.spacing'", "positive", "[1.0, 0.0]"]),
    ({"spacing": [-0.5]}, {}, None, ["params key 'evaluate.sets.seg.spacing'", "positive", "[-0.5]"]),
    ({}, {"beta": -0.1}, None, ["params key 'evaluate.segmentation.beta' must be zero or positive", "-0.1"]),
], ids=["image-without-mask", "mask-of-another-size", "non-binary-mask", "empty-prompt", "zero-spacing",
        "negative-spacing", "negative-beta"])
def test_data_stage_rejects_a_segmentation_set(tiny_project, spec, segmentation, damage, needles):
    root = segmentation_set(tiny_project, spec, **segmentation)
    if damage:
        damage(root)
    assert_user_error(run_stage_here(tiny_project, "data", "data/world.json", "data/eval"), *needles)
    assert_absent(tiny_project, "data/eval")


def prepare_segmentation(project: Path, **segmentation) -> Path:
    """Concept files, the `seg` set and the data stage's manifest; returns the set's root."""
    write_concepts(project)
    root = segmentation_set(project, **segmentation)
    result = run_stage_here(project, "data", "data/world.json", "data/eval")
    assert result.returncode == 0, result.stderr
    return root


def test_evaluate_stage_segments_the_prepared_set(tiny_project):
    """The setup of the tests below evaluates when nothing is wrong with it."""
    prepare_segmentation(tiny_project)
    result = run_stage_here(tiny_project, "evaluate", *EVAL_ARGS)
    assert result.returncode == 0, result.stderr
    assert (tiny_project / "metrics/eval/baseline/seg.segmentation.parquet").is_file()


@pytest.mark.parametrize("segmentation, needles", [
    ({"layer": 1}, ["params key 'evaluate.segmentation.layer' is 1", "vision tower has 1 blocks", "use 0 to 0"]),
    ({"sam": "models/no_sam_here/"}, ["cannot load SAM checkpoint 'models/no_sam_here/'", "no such folder",
                                      "params key 'evaluate.segmentation.sam'"]),
], ids=["layer-beyond-the-tower", "missing-sam-folder"])
def test_evaluate_stage_rejects_segmentation_settings(tiny_project, segmentation, needles):
    prepare_segmentation(tiny_project, **segmentation)
    assert_user_error(run_stage_here(tiny_project, "evaluate", *EVAL_ARGS), *needles)
    assert_absent(tiny_project, *EVAL_OUTPUTS)


def test_evaluate_stage_with_a_mask_changed_after_the_data_stage(tiny_project):
    root = prepare_segmentation(tiny_project)
    mask_of_another_size(root)
    assert_user_error(run_stage_here(tiny_project, "evaluate", *EVAL_ARGS),
                      "seg/masks/b.png is 16x12 pixels but its image is 16x16")
    assert_absent(tiny_project, *EVAL_OUTPUTS)


def test_evaluate_stage_with_a_sam_hub_id_not_in_the_cache(tiny_project):
    prepare_segmentation(tiny_project, sam="ktpipe-tests/no-such-sam")
    assert_user_error(run_stage(tiny_project, "evaluate", *EVAL_ARGS),
                      "cannot load SAM checkpoint 'ktpipe-tests/no-such-sam'", "params key 'evaluate.segmentation.sam'")
    assert_absent(tiny_project, *EVAL_OUTPUTS)
