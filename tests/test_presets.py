"""The paper presets: each validates against the typed params, and each runs its stages on a
random-init model of its family, on generated datasets in the layouts the presets expect
(docs/datasets.md).

The short runs shrink what only repeats work (one concept, one recipe, 2 inverted images (ViLT:
1), 2 inversion steps, 3 ImageNet classes (ImageNet-100: 2), the first prompt template of each
set, a second concept for image-text matching's mismatch caption, captions decoded with 2 beams
of at most 8 tokens) and keep everything else as the preset has it.

Real size (`REAL_SIZE`): one preset of each (architecture, tasks) pair runs on a random-init model
of its real architecture at its real input size: table1_vit_b32 (ViT-B/32, classification),
table2_biomedclip (BiomedCLIP, classification), table4_medclip_samv2 (BiomedCLIP, segmentation),
table1_vilt (ViLT-B/32 at 384 px, classification), table5_vilt_flickr (ViLT, retrieval) and
table6_coca (CoCa, captioning). The other eight repeat one of those architectures and tasks with
another preset config (recipes over the towers, name prefixes, noise images, every concept at
once, another lr): they run every stage with that config on the tiny random-init model of their
family that tests/test_preset_runs.py runs them under DVC with (`TINY`), and the step of each of
their recipes at real size is tests/test_preset_learning.py's (and _vilt's) to check.
Stand-ins: a random-init ViT-L-14 (428M parameters) costs about 100 s per run on the test
machine's one thread, so ViT-L-14 and CoCa ViT-L/14 are built, saved, loaded offline and run at
224 px in tests/test_models.py (`archs.ARCHS`), and their presets run here as the smaller sibling
of their family: the CoCa preset on a random-init `coca_ViT-B-32` (its text decoder included), on
a generated MSCOCO Karpathy layout.
The segmentation preset (Tables 4 and 7, MedCLIP-SAMv2) runs M2IB with one step of one noisy copy
(the others repeat the same forward and backward pass) and prompts a tiny random-init SAM saved to
a folder (tests/test_sam.py's config) in place of SAM ViT-H, on four generated `masks` layouts.
Checkpoints come from conftest's session fixture `random_checkpoint`, built once per architecture,
and each checkpoint folder is loaded through the open_clip backend once per module (`load_once`):
later loads of the same folder get a copy, as a fresh load would give (loading itself is
tested in tests/test_models.py and tests/test_export.py).
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from ruamel.yaml import YAML
from safetensors.torch import load_file

from archs import ARCHS, VILT_B32
from conftest import REPO, deep_merge
from test_preset_runs import STAND_INS
from ktpipe import models
from ktpipe.base_model import run_base_model
from ktpipe.concepts import load_concepts_file
from ktpipe.datasets import run_data
from ktpipe.describe import run_concepts
from ktpipe.eval import run_evaluate
from ktpipe.transfer.finetune import run_finetune
from ktpipe.transfer.invert import run_invert
from ktpipe.params import load_params
from ktpipe.report import load_paper_results, run_report
from ktpipe.templates import load_templates

PRESETS = sorted(p.stem for p in (REPO / "presets").glob("*.yaml"))
ARCH = {"ViT-B-32": "ViT-B-32", "ViT-L-14": "ViT-L-14", "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224": "biomedclip",
        "dandelin/vilt-b32-mlm-itm": VILT_B32, "coca_ViT-L-14": "coca_ViT-L-14"}
SMALLER_SIBLING = {"ViT-L-14": "ViT-B-32", "coca_ViT-L-14": "coca_ViT-B-32"}  # architecture -> what runs here (docstring)
REAL_SIZE = ("table1_vit_b32", "table2_biomedclip", "table4_medclip_samv2", "table1_vilt", "table5_vilt_flickr",
             "table6_coca")  # one preset per (architecture, tasks): the docstring
TINY = {"ViT-B-32": "clip", "ViT-L-14": "clip", "biomedclip": "biomedclip", VILT_B32: "vilt",
        "coca_ViT-L-14": "coca"}  # architecture -> tests/test_preset_runs.py's tiny model of its family
CHEXPERT = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def read_preset(name: str) -> dict:
    return YAML(typ="safe", pure=True).load((REPO / "presets" / f"{name}.yaml").read_text())


def test_every_paper_experiment_has_a_preset():
    assert set(PRESETS) >= {"table1_vit_b32", "table1_vit_l14", "table2_biomedclip", "table3_vit_b32",
                            "table3_vit_l14", "fig4_towers", "fig5_name_prefix", "noise_baseline",
                            "table1_vilt", "table5_vilt_flickr", "table11_vilt_mlm", "table6_coca", "table6_coca_ft",
                            "table4_medclip_samv2"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_validates_and_its_references_exist(name, monkeypatch):
    monkeypatch.chdir(REPO)
    params = load_params(REPO / "presets" / f"{name}.yaml")
    assert params.model.backend in ("open_clip", "vilt") and params.model.name in ARCH
    described = load_concepts_file(REPO / params.concepts.file)
    assert set(params.concepts.names) <= set(described)
    assert params.models() == ("baseline", *params.recipes)
    assert params.invert.steps == 5000 and params.invert.tv_weight == 0.005 and params.invert.samples == 10
    vilt = params.model.backend == "vilt"
    if vilt:  # paper Sec. 4.3 and 8.2: N(0, 1) start, no random affine, ViLT's weight decay
        assert params.invert.init == "normal" and params.invert.affine_p == 0.0
    for recipe in params.recipes:
        cfg = params.recipe(recipe)
        assert (cfg.optimizer, cfg.weight_decay) == (("adamw", 0.01) if vilt else ("adam", 0.2))
        assert (cfg.loss in ("itm", "mlm")) == vilt
    for spec in params.evaluate.sets.values():
        assert spec.root and spec.root.startswith("$KTPIPE_DATASETS")
        assert spec.labels is None or spec.labels.startswith("$KTPIPE_DATASETS")
        assert load_templates(spec.templates or params.evaluate.templates)
    if params.report.paper:
        assert not load_paper_results(params.report.paper).empty


def real_arch(name: str) -> str:
    """The architecture a preset's real-size run uses: its own, or the smaller sibling of its family."""
    arch = ARCH[read_preset(name)["model"]["name"]]
    return SMALLER_SIBLING.get(arch, arch)


def tasks(name: str) -> frozenset[str]:
    return frozenset(spec.get("task", "classification") for spec in read_preset(name)["evaluate"]["sets"].values())


def test_every_preset_architecture_and_task_runs_at_real_size():
    """`REAL_SIZE` holds one preset of every (architecture, tasks) pair the presets name, and every
    architecture a preset names runs at real size here or in tests/test_models.py (`archs.ARCHS`)."""
    assert {(real_arch(n), tasks(n)) for n in PRESETS} == {(real_arch(n), tasks(n)) for n in REAL_SIZE}
    assert len(set(REAL_SIZE)) == len(REAL_SIZE) == len({(real_arch(n), tasks(n)) for n in REAL_SIZE})
    named = {ARCH[read_preset(name)["model"]["name"]] for name in PRESETS}
    assert named <= {real_arch(n) for n in REAL_SIZE} | set(ARCHS)
    assert set(TINY) == named


# --- generated datasets in the presets' layouts ----------------------------------------------


def write_png(path: Path, rng: np.random.Generator, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def write_datasets(root: Path) -> Path:
    """$KTPIPE_DATASETS with rare_concepts, imagenet/val, chexpert, jsrt, flickr30k, mscoco and the
    four segmentation sets, 1-2 images per class (or per set)."""
    rng = np.random.default_rng(0)
    for concept in ("moongate", "tonometer", "gyroscope"):
        write_png(root / "rare_concepts" / concept / "0.jpg", rng)
    wnids = [w for w in (REPO / "ktpipe/data/imagenet/wnids.txt").read_text().split() if w.startswith("n")]
    for wnid in wnids:
        write_png(root / "imagenet/val" / wnid / "ILSVRC2012_val_0.JPEG", rng, 4)
    rows = []
    for k, name in enumerate(CHEXPERT):
        path = f"CheXpert-v1.0/valid/patient{k}/view1_frontal.jpg"
        write_png(root / "chexpert" / path, rng)
        rows.append({"Path": path, **{c: float(c == name) for c in CHEXPERT}})
    pd.DataFrame(rows).to_csv(root / "chexpert/chexpert_5x200.csv", index=False)
    lines = ["JPCLN001.IMG\t3\t15\t56\tfemale\t1634\t692\tmalignant\tl.upper lobe\tlung cancer",
             "JPCLN002.IMG\t4\t20\t61\tmale\t1200\t900\tbenign\tr.lower lobe\thamartoma"]
    (root / "jsrt").mkdir(parents=True)
    (root / "jsrt/CLNDAT_EN.txt").write_text("\n".join(lines) + "\n")
    for stem in ("JPCLN001", "JPCLN002"):
        write_png(root / "jsrt" / f"{stem}.png", rng)
    write_flickr(root / "flickr30k", rng)
    write_mscoco(root / "mscoco", rng)
    for name in (*SEGMENTATION_SETS, *(f"{n}_val" for n in SEGMENTATION_SETS)):
        write_masks_layout(root / name, rng)
    return root


SEGMENTATION_SETS = ("unitochest", "siim_pneumothorax", "udiat", "brats23")  # roots in table4_medclip_samv2.yaml


def write_masks_layout(root: Path, rng: np.random.Generator) -> None:
    """A flat `masks` layout: images/0.png and images/1.jpg (40x32, noise with a brighter block)
    with their binary masks masks/0.png and masks/1.png (0 and 255 on the block)."""
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    for i, suffix in enumerate((".png", ".jpg")):
        mask = np.zeros((32, 40), dtype=np.uint8)  # (H, W)
        mask[6 + 4 * i:20 + 4 * i, 10 + 5 * i:26 + 5 * i] = 255
        pixels = rng.integers(0, 100, (32, 40, 3)) + (mask[..., None] > 0) * 120
        Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / f"{i}{suffix}")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")


def write_flickr(root: Path, rng: np.random.Generator) -> None:
    """Flickr30k's layout: images/<filename> and the Karpathy split file dataset_flickr30k.json
    (2 test images with 5 captions each, one train image)."""
    words = ["a dog runs on the grass", "a man rides a bicycle", "two people sit on a bench", "a cat on a car"]
    images = []
    for i, split in enumerate(["test", "test", "train"]):
        name = f"{1000 + i}.jpg"
        write_png(root / "images" / name, rng, 12)
        sentences = [{"raw": f"{words[(i + j) % len(words)]} {j}.", "tokens": []} for j in range(5)]
        images.append({"filename": name, "split": split, "sentences": sentences, "imgid": i})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))


def write_mscoco(root: Path, rng: np.random.Generator) -> None:
    """MSCOCO's Karpathy layout: dataset_coco.json (filepath + filename, 5 sentences per image) and the
    images under root/val2014/ (2 test images, one restval)."""
    words = ["a person riding a bicycle down a street", "a dog sitting on a couch", "a pizza on a dining table",
             "a cat sleeping next to a laptop", "two people standing near a bus"]
    images = []
    for i, split in enumerate(["test", "test", "restval"]):
        name = f"COCO_val2014_{i:012d}.jpg"
        write_png(root / "val2014" / name, rng, 12)
        sentences = [{"raw": f"{words[(i + j) % len(words)].capitalize()}.", "tokens": words[(i + j) % len(words)].split()}
                     for j in range(5)]
        images.append({"filepath": "val2014", "filename": name, "split": split, "sentences": sentences,
                       "imgid": i, "cocoid": i})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))


@pytest.fixture(scope="module")
def loaded() -> dict:
    """(name, pretrained) -> the model the open_clip backend loaded, for this module."""
    return {}


@pytest.fixture
def load_once(loaded, monkeypatch):
    """The open_clip and ViLT backends, loading each (name, pretrained) once per module and handing
    out copies (of the weights; the tokenizer and processor are shared)."""
    for backend in ("open_clip", "vilt"):
        load = models.BACKENDS[backend]

        def load_copy(name: str, pretrained: str | None, device: str, load=load, backend=backend):
            if (backend, name, pretrained) not in loaded:
                loaded[backend, name, pretrained] = load(name, pretrained, device)
            model = loaded[backend, name, pretrained]
            shared = [getattr(model, a) for a in ("tokenizer", "processor") if hasattr(model, a)]  # never modified:
            return copy.deepcopy(model, memo={id(x): x for x in shared})  # copying CLIP's BPE tables cost 3 s

        monkeypatch.setitem(models.BACKENDS, backend, load_copy)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    return write_datasets(tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """tests/test_preset_runs.py's STAND_INS name -> how params name that tiny random-init model,
    each built on first use (the tiny SAM of the segmentation preset among them)."""
    root, built = tmp_path_factory.mktemp("stand_ins"), {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = STAND_INS[name](root / name)
        return built[name]

    return get


def first_template(name: str, folder: Path) -> str:
    """A one-line template file holding the first template of a packaged set."""
    path = folder / f"{name}-first.txt"
    path.write_text(load_templates(name)[0] + "\n")
    return str(path)


IMAGENET100_CLASSES = ["American robin", "Gila monster"]  # two of its classes (ViLT scores each pair)


def shrink(preset: dict, model: str, folder: Path, sam: str | None = None, first_size: int = 64) -> dict:
    """The preset on the checkpoint params name `model`, with only repeated work cut down (see the
    module docstring); inversion's first progressive size `first_size`. An image-text matching
    recipe keeps a second concept: its caption is the mismatch of a one-concept recipe. A
    segmentation preset's SAM becomes the folder `sam` (a tiny random-init SAM)."""
    recipe, overrides = next(iter(preset["recipes"].items()))
    names = preset["concepts"]["names"]
    concepts = list(overrides.get("concepts") or names[:1])
    if preset["finetune"].get("loss") == "itm":
        concepts += [n for n in names if n not in concepts][:1]
    default = preset["evaluate"]["templates"]
    sets = {}
    for name, spec in preset["evaluate"]["sets"].items():
        sets[name] = {**spec, "templates": first_template(spec.get("templates") or default, folder)}
        if spec["format"] == "imagenet":
            sets[name]["classes"] = ["tench", "goldfish", "great white shark"]
        if spec["format"] == "imagenet100":
            sets[name]["classes"] = IMAGENET100_CLASSES
    out = deep_merge(preset, {
        "concepts": {"names": concepts},
        "model": {"name": model, "pretrained": None, "device": "cpu"},
        "invert": {"steps": 2, "samples": 2, "progressive_sizes": [first_size], "progressive_steps": [1]},
        "finetune": {"epochs": 1},
        "evaluate": {"batch_size": 8, "workers": 0, "sets": sets},
    })
    out["recipes"] = {recipe: overrides}  # replaced, not merged: the others name other concepts
    if preset["model"]["backend"] == "vilt":  # one image per concept: each pair costs ~0.5 s at 384 px
        out["invert"]["samples"] = 1
    if "generation" in preset["evaluate"]:  # captioning: 2 beams, 8 tokens (the preset's 6 beams of 30 tokens
        # repeat the same decoding step; on a random-init CoCa no caption ends early: ~70 s per model and 2 images)
        out["evaluate"]["generation"] = {**preset["evaluate"]["generation"], "beams": 2, "beam_groups": 1,
                                          "max_length": 8}
    if "segmentation" in preset["evaluate"]:  # M2IB: one step of one noisy copy (~2 forward passes per image)
        cheap = {"steps": 1, "noise_samples": 1, "batch_size": 2}
        search = preset["evaluate"]["segmentation"].get("hyper_opt")
        if search:  # the search over one setting (the preset's: 27), for the report's target set and its
            # validation set only: the other sets repeat the same M2IB passes on other folders of the same
            # layout (~22 s per set and model at 224 px; tests/test_preset_runs.py runs every set under DVC)
            target = preset["report"]["target_set"]
            kept = {target, search["sets"][target]}
            out["evaluate"]["sets"] = {name: spec for name, spec in sets.items() if name in kept}
            cheap["hyper_opt"] = {**search, "beta": [0.1], "variance": [1.0], "sets": {target: search["sets"][target]},
                                  "layer": [preset["evaluate"]["segmentation"]["layer"]]}
        if preset["evaluate"]["segmentation"].get("sam"):
            cheap["sam"] = sam
        out["evaluate"]["segmentation"] = {**preset["evaluate"]["segmentation"], **cheap}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_every_stage(name, datasets, random_checkpoint, stand_in, load_once, tmp_path, monkeypatch):
    preset = read_preset(name)
    arch, real = real_arch(name), name in REAL_SIZE
    model = f"local-dir:{random_checkpoint(arch)}" if real else stand_in(TINY[ARCH[preset["model"]["name"]]])
    project = tmp_path / "project"
    shutil.copytree(REPO / "captions", project / "captions")
    sam = stand_in("sam") if preset["evaluate"].get("segmentation", {}).get("sam") else None
    with (project / "params.yaml").open("w") as fh:
        YAML(typ="safe", pure=True).dump(shrink(preset, model, project, sam, 64 if real else 8), fh)
    monkeypatch.chdir(project)
    monkeypatch.setenv("KTPIPE_DATASETS", str(datasets))
    params = load_params("params.yaml")
    recipe = next(iter(params.recipes))

    sets = run_data(params, Path("data/eval"))
    assert set(sets) == set(params.evaluate.sets) and all(s["n_images"] > 0 for s in sets.values())
    size = run_base_model(params, Path("models/baseline"), Path("metrics/base_model.json"))["image_size"]
    assert size == (384 if arch == VILT_B32 else 224) or not real
    run_concepts(Path(params.concepts.file), Path(params.concepts.generated), params.concepts, Path("data/concepts"))
    cfg = params.recipe(recipe)
    for concept in params.concepts.names:
        meta = run_invert(params, Path(f"data/concepts/{concept}.json"), Path(f"data/inverted/{concept}"))
        assert meta["concept"] == concept and meta["image_size"] == size
        pixels = load_file(f"data/inverted/{concept}/images.safetensors")["pixels"]
        samples = params.invert.samples
        assert pixels.shape == (samples, 3, size, size) and 0 <= pixels.min() and pixels.max() <= 1
    summary = run_finetune(params, recipe, Path("data/concepts"), Path("data/inverted"),
                           Path(f"models/{recipe}"), Path(f"metrics/finetune/{recipe}.json"))
    assert summary["n_images"] == samples * len(cfg.concepts or params.concepts.names)
    assert summary["lr"] == pytest.approx(params.lr * cfg.lr_multiplier)
    assert all(record["loss"] > 0 for record in summary["log"])
    if cfg.loss == "itm":  # every image meets a caption that is not its own
        assert len(summary["captions"]) + len(summary["negatives"]) >= 2
        assert not set(summary["negatives"]) & set(summary["captions"])
    for model in params.models():
        result = run_evaluate(params, model, Path(f"models/{model}"), Path("data/eval"), Path("data/concepts"),
                              Path(f"metrics/eval/{model}.json"))
        assert result["tasks"] == {set_name: spec.task for set_name, spec in params.evaluate.sets.items()}
        for set_name, spec in params.evaluate.sets.items():
            found = result["metrics"][set_name][spec.task]
            key = {"classification": "name_overall_acc", "retrieval": "t2i_r1", "captioning": "meteor",
                   "segmentation": "dsc"}[spec.task]
            assert 0 <= found[key] <= 1
            if spec.task == "segmentation":  # every image scored (SAM's mask, and the saliency mask it refines)
                rows = pd.read_parquet(f"metrics/eval/{model}/{set_name}.segmentation.parquet")
                assert len(rows) == found["n_images"] == 2 and rows["dsc"].between(0, 1).all()
                assert ("saliency_dsc" in found) == (params.evaluate.segmentation.sam is not None)
            if spec.task == "captioning":  # every test image captioned and scored, CIDEr included
                assert found["n_images"] == 2 and found["cider"] >= 0
            if spec.task == "retrieval" and arch == VILT_B32:  # every image with every caption
                assert found["pairs_scored"] == found["n_images"] * found["n_captions"]
    report = run_report(params, Path("metrics/eval"), Path("data/concepts"), Path("data/inverted"), Path("reports"))
    text = Path("reports/results.md").read_text()
    if all(spec.task == "classification" for spec in params.evaluate.sets.values()):
        head = report["headline"][recipe]
        assert head["target"] is not None and head["retention"] is not None
    if params.report.paper:
        assert "(paper " in text
