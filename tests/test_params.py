"""Typed params: the repo's params.yaml loads; typos, wrong types and bad values are named."""

from pathlib import Path

import pytest

from ktpipe.params import FinetuneParams, InvertParams, ParamsError, load_params

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
LR_LINE = next(line for line in REPO_PARAMS.read_text().splitlines() if line.startswith("lr:"))


def edited(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the repo's params.yaml with one line replaced."""
    text = REPO_PARAMS.read_text()
    assert text.count(old) == 1, f"{old!r} must occur once in params.yaml"
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(old, new))
    return path


def test_repo_params_load():
    params = load_params(REPO_PARAMS)
    assert isinstance(params.lr, float) and params.lr == float(LR_LINE.split()[1])
    assert params.invert.steps == 300 and params.invert.image_size is None
    assert "blicket" in params.concepts and isinstance(params.concepts, tuple)
    assert set(params.recipes) == {"paper", "full"}


def test_dvc_style_float_is_a_float(tmp_path):
    params = load_params(edited(tmp_path, LR_LINE, "lr: 2e-05"))
    assert isinstance(params.lr, float) and params.lr == 2e-05


@pytest.mark.parametrize(
    "old, new, key",
    [
        ("seed: 0", "seed: 0\nsede: 1", "sede"),
        ("  steps: 300", "  stepz: 300", "stepz"),
        ("  steps: 300", '  steps: "300"', "invert.steps"),
        ("  steps: 300", "  steps: true", "invert.steps"),
        ("  rehearsal: false", "  rehearsal: 1", "finetune.rehearsal"),
        (LR_LINE, "lr: abc", "'lr'"),
        (LR_LINE, "lr: -1", "'lr'"),
        (LR_LINE, "lr: 0", "'lr'"),
        ("  towers: visual", "  towers: legs", "towers"),
    ],
)
def test_bad_values_are_rejected_by_name(tmp_path, old, new, key):
    with pytest.raises(ParamsError, match=key):
        load_params(edited(tmp_path, old, new))


def test_unknown_nested_key_names_its_section(tmp_path):
    with pytest.raises(ParamsError, match=r"stepz.*'invert'"):
        load_params(edited(tmp_path, "  steps: 300", "  stepz: 300"))


@pytest.mark.parametrize("value", ["-1", "0"])
def test_lr_must_be_positive(tmp_path, value):
    with pytest.raises(ParamsError, match="positive"):
        load_params(edited(tmp_path, LR_LINE, f"lr: {value}"))


def test_recipe_merges_overrides():
    params = load_params(REPO_PARAMS)
    full = params.recipe("full")
    assert isinstance(full, FinetuneParams) and full.rehearsal is True
    assert full.epochs == params.finetune.epochs and params.finetune.rehearsal is False
    assert params.recipe("paper") == params.finetune


def test_unknown_recipe_name_raises():
    with pytest.raises(ParamsError, match="nope"):
        load_params(REPO_PARAMS).recipe("nope")


def test_recipe_override_with_unknown_key_names_the_recipe(tmp_path):
    with pytest.raises(ParamsError, match=r"recipes\.full"):
        load_params(edited(tmp_path, "full: {rehearsal: true}", "full: {rehersal: true}"))


def test_bad_recipe_towers_names_the_recipe(tmp_path):
    with pytest.raises(ParamsError, match=r"recipes\.full"):
        load_params(edited(tmp_path, "full: {rehearsal: true}", "full: {towers: legs}"))


def test_non_mapping_recipe_is_a_params_error(tmp_path):
    with pytest.raises(ParamsError, match=r"recipes\.full"):
        load_params(edited(tmp_path, "full: {rehearsal: true}", "full: [rehearsal]"))


def test_demo_evaluation_sets_and_report_keys_load():
    params = load_params(REPO_PARAMS)
    assert list(params.evaluate.sets) == ["val", "test"]
    assert params.evaluate.sets["val"].format == "demo" and params.evaluate.sets["test"].split == "test"
    assert params.report.target_set == params.report.retention_set == "test"


def test_dataclass_defaults_are_the_papers_inversion():
    cfg = InvertParams()
    assert (cfg.steps, cfg.tv_weight, cfg.samples, cfg.affine_p, cfg.rotation, cfg.translate) == (
        5000, 0.005, 10, 0.5, 30.0, 0.1)
    assert (cfg.scale_min, cfg.scale_max, cfg.progressive, cfg.grad_clip) == (0.7, 1.0, False, None)


SETS_LINE = "    test: {format: demo, split: test}"
GENERATOR_LINE = next(line for line in REPO_PARAMS.read_text().splitlines() if line.startswith("  generator:"))


@pytest.mark.parametrize(
    "old, new, needles",
    [
        (SETS_LINE, "    test: {format: pictures, split: test}", ["evaluate.sets.test.format", "pictures"]),
        (SETS_LINE, "    test: {format: folder}", ["evaluate.sets.test.root"]),
        (SETS_LINE, "    test: {format: demo, split: train}", ["evaluate.sets.test.split"]),
        (SETS_LINE, "    test: {format: demo, split: test, subset: 0}", ["evaluate.sets.test.subset"]),
        (SETS_LINE, "    test: {format: demo, split: test, extra_classes: [imagenet]}", ["extra_classes", "imagenet"]),
        (SETS_LINE, "    test: {format: demo, split: test, sise: 3}", ["sise", "evaluate.sets.test"]),
        (SETS_LINE, "    test-set: {format: demo, split: test}", ["test-set"]),
        ("  target_set: test", "  target_set: imagenet", ["report.target_set", "imagenet"]),
        ("full: {rehearsal: true}", "full: {concepts: [moongate]}", ["recipes.full.concepts", "moongate"]),
        ("full: {rehearsal: true}", "full: {images: photos}", ["recipes.full.images"]),
        ("full: {rehearsal: true}", "full: {lr_multiplier: 0}", ["recipes.full.lr_multiplier"]),
        ("  scale_max: 1.0", "  scale_max: 1.0\n  progressive_sizes: [64]", ["progressive_sizes"]),
        ("  scale_max: 1.0", "  scale_max: 1.0\n  grad_clip: -1", ["invert.grad_clip"]),
        (GENERATOR_LINE, "  generator: {max_new_tokens: 10}", ["captions.generator.model"]),
    ],
)
def test_bad_new_keys_are_named(tmp_path, old, new, needles):
    with pytest.raises(ParamsError) as err:
        load_params(edited(tmp_path, old, new))
    for needle in needles:
        assert needle in str(err.value)
