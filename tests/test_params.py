"""Typed params: the repo's params.yaml loads; typos, wrong types and bad values are named."""

from pathlib import Path

import pytest

from ktpipe.params import FinetuneParams, ParamsError, load_params

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
