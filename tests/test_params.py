"""Typed params: the repo's params.yaml loads; typos, wrong types and bad values are named."""

from pathlib import Path

import pytest
from ruamel.yaml import YAML

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
    assert "blicket" in params.concepts.names and isinstance(params.concepts.names, tuple)
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
    assert list(params.evaluate.sets) == ["val", "test", "test_captions", "test_pairs", "test_segmentation",
                                        "test_captioning", "test_small"]
    assert params.evaluate.sets["val"].format == "demo" and params.evaluate.sets["test"].split == "test"
    assert params.evaluate.sets["test_captions"].task == "retrieval"
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
        (SETS_LINE, "    test: {format: karpathy, split: dev, root: x, labels: y}", ["evaluate.sets.test.split", "restval"]),
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
        (GENERATOR_LINE, "  generator: {max_new_tokens: 10}", ["concepts.generator.model"]),
    ],
)
def test_bad_new_keys_are_named(tmp_path, old, new, needles):
    with pytest.raises(ParamsError) as err:
        load_params(edited(tmp_path, old, new))
    for needle in needles:
        assert needle in str(err.value)


# --- the concepts section (was a top-level list plus a 'captions' section) --------------------


def rewritten(tmp_path: Path, change) -> Path:
    """A copy of the repo's params.yaml whose parsed mapping `change(raw)` edited in place."""
    raw = YAML(typ="safe", pure=True).load(REPO_PARAMS.read_text())
    change(raw)
    path = tmp_path / "params.yaml"
    with path.open("w") as fh:
        YAML(typ="safe", pure=True).dump(raw, fh)
    return path


def test_concepts_section_loads():
    concepts = load_params(REPO_PARAMS).concepts
    assert concepts.names[:3] == ("blicket", "dax", "wug")
    assert (concepts.file, concepts.generated, concepts.generator, concepts.truncate) == (
        "captions/demo.yaml", "captions/generated.yaml", None, False)


def test_old_captions_section_says_it_was_renamed(tmp_path):
    def add_captions(raw):
        raw["captions"] = {"file": "captions/demo.yaml", "generated": "captions/generated.yaml"}

    with pytest.raises(ParamsError, match="'captions' was renamed") as err:
        load_params(rewritten(tmp_path, add_captions))
    assert "concepts.names" in str(err.value)


@pytest.mark.parametrize("with_captions", [False, True], ids=["list", "old-layout"])
def test_top_level_concepts_list_says_it_is_now_a_section(tmp_path, with_captions):
    def old_layout(raw):
        section = raw.pop("concepts")
        raw["concepts"] = section.pop("names")
        if with_captions:
            raw["captions"] = section

    with pytest.raises(ParamsError, match="'concepts' is now a section") as err:
        load_params(rewritten(tmp_path, old_layout))
    assert "names" in str(err.value)


def test_concept_listed_twice_is_named(tmp_path):
    with pytest.raises(ParamsError, match="'concepts.names' lists a concept twice"):
        load_params(rewritten(tmp_path, lambda raw: raw["concepts"]["names"].append("dax")))


# --- the evaluated models, evaluate.use and the evaluation sets' tasks ------------------------

USE_LINE = next(line for line in REPO_PARAMS.read_text().splitlines() if line.startswith("  use:"))


def test_evaluated_models_are_baseline_and_every_recipe_named_once():
    params = load_params(REPO_PARAMS)
    assert params.models() == ("baseline", "paper", "full")


def test_old_evaluate_models_key_names_the_move(tmp_path):
    with pytest.raises(ParamsError, match=r"'evaluate.models' was renamed: delete it.*evaluate_baseline"):
        load_params(rewritten(tmp_path, lambda raw: raw["evaluate"].update(models=["baseline", "paper", "full"])))


def test_evaluate_use_picks_sets_and_names_unknown_ones(tmp_path):
    params = load_params(edited(tmp_path, USE_LINE, "  use: [test, val]"))
    assert list(params.used_sets()) == ["test", "val"] and len(params.evaluated_sets()) == 7
    with pytest.raises(ParamsError, match=r"'evaluate.use' names \['nowhere'\]"):
        load_params(edited(tmp_path, USE_LINE, "  use: [test, nowhere]"))


def test_a_recipe_named_baseline_is_refused(tmp_path):
    def baseline_recipe(raw):
        raw["recipes"]["baseline"] = {}

    with pytest.raises(ParamsError, match=r"'recipes\.baseline'.*before transfer"):
        load_params(rewritten(tmp_path, baseline_recipe))


def test_evaluation_sets_default_to_classification(tmp_path):
    sets = load_params(REPO_PARAMS).evaluate.sets
    assert {name: s.task for name, s in sets.items()} == {"val": "classification", "test": "classification",
                                                          "test_captions": "retrieval", "test_pairs": "retrieval",
                                                          "test_segmentation": "segmentation",
                                                          "test_captioning": "captioning",
                                                          "test_small": "classification"}
    params = load_params(edited(tmp_path, SETS_LINE, "    test: {format: demo, split: test, task: classification}"))
    assert params.evaluate.sets["test"].task == "classification"


def test_a_trained_decoder_without_captioning_loss_is_refused(tmp_path):
    def decoder_without_loss(raw):
        raw["recipes"]["paper"] = {"loss": "coca", "decoder": True, "caption_weight": 0.0}

    with pytest.raises(ParamsError, match=r"'recipes.paper.decoder' trains the text decoder.*caption_weight' is 0"):
        load_params(rewritten(tmp_path, decoder_without_loss))


def test_a_recipe_named_families_is_refused(tmp_path):
    with pytest.raises(ParamsError, match=r"'recipes.families'.*metrics/eval/families"):
        load_params(rewritten(tmp_path, lambda raw: raw["recipes"].update(families={})))
