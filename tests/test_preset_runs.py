"""The paper presets under the real DVC: `cp presets/<preset>.yaml params.yaml`, then `dvc exp run`.

For five presets, one of each kind (CLIP classification, BiomedCLIP on chest X-rays, ViLT retrieval,
CoCa captioning, MedCLIP-SAMv2 segmentation), a temporary clone of the repository (its git files,
as the working tree has them, committed to a fresh git repo; `.dvc/` comes with them) copies the
preset over params.yaml, commits it and runs `dvc exp run` with `-S` overrides that change only the
weights and the sizes (`PresetRun.overrides`), on tests/datasets_fixture.py's tiny datasets in the
presets' real layouts (`$KTPIPE_DATASETS`). Each run must:

1. run every stage that `dvc stage list` names for the experiment's params, each once;
2. record the metrics docs/presets.md points at, as `dvc exp show --json` lists
   them (per model `metrics/eval/<model>.json`: `metrics.<set>.<task>.<metric>`; the report's
   `reports/metrics.json`: `headline.<recipe>.target` / `retention`, `<set>.<task>.<model>.<metric>`);
3. print the paper's numbers beside ours in reports/results.md (`report.paper` selects rows of
   ktpipe/data/paper_results.csv): one published number, quoted in `PresetRun.paper`.

Stand-ins (`STAND_INS`), each a random-init model of the preset's family, small enough that a stage
spends its time in DVC and the start-up (a run's first stage imports the libraries, 7 s on an idle
core; the later ones are forked from the warm-start server, ktpipe/warm.py) rather than in the model:
- CLIP ViT-B/32 -> a 2-layer, 32-wide open_clip CLIP ViT at 32 px with CLIP's BPE tokenizer and
  77-token context (the real ViT-B-32 runs every stage in tests/test_presets.py);
- BiomedCLIP -> its published config with timm's `test_vit3` trunk (a 9-block, 96-wide ViT/16 at
  160 px: MedCLIP-SAMv2's saliency layer 7 exists; open_clip builds a timm trunk at the timm model's
  own input size) and tests/archs.py's tiny BERT text tower (the concept files' words in its
  vocabulary), for table2_biomedclip and table4_medclip_samv2;
- SAM ViT-H -> tests/test_sam.py's tiny random-init SAM saved in transformers' layout;
- ViLT-B/32 (dandelin/vilt-b32-mlm-itm) -> tests/archs.py's tiny ViLT with both heads (ITM, MLM);
- CoCa ViT-L/14 -> a 2-layer, 32-wide open_clip CoCa at 32 px (attentional pooler, text decoder).
Sizes: 2 inversion steps of 2 images (ViLT: 1) through one progressive size (8 px), 3 ImageNet
classes, captions of 3 beams (one per beam group) and 8 tokens, M2IB with one step of one noisy copy
and a saliency search over one setting on one validation image, image decoding in the stage's own
process (`evaluate.workers=0`). Each stage still pays DVC's second around it, so a run keeps the fewest
concepts that still cover every stage kind: the MSCOCO presets learn 80 concepts, one inversion stage
each, and their runs keep 2 (`concepts.names`; ViLT's image-text matching needs a second concept's
caption as its mismatch); the presets whose recipes are one per concept keep one concept and its
recipe (`keep`: the one whose published number the run checks), and the CoCa run keeps its dagger recipe
(`transfer_decoder`: the other two train a subset of its weights, or the same at another lr); every run
has 8 to 10 stages. Overrides of keys that a
preset leaves out take `+` (`-S +key=value`, hydra's syntax, which `dvc exp run` uses).

`pytest -n 0 -s` (or `-rP`) prints each run's wall time and its stages: 40-93 s each in the full suite
on the 2-core test machine (`-n 2`, 2026-12-07, with warm starts; 89-161 s before them).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from archs import TINY_VILT, biomedclip_config, concept_words, write_tiny_bert, write_vilt
from conftest import REPO
from test_dvc_e2e import RUNNING, make_env
from test_sam import TINY_SAM

pytestmark = pytest.mark.slow

EXP_RUN_TIMEOUT = 600  # seconds; a run takes 3-4 minutes on 2 busy cores
RAN = re.compile(r"Ran experiment\(s\): (\S+)")

# --- stand-ins ----------------------------------------------------------------------------------

TINY_CLIP = {  # open_clip CLIP ViT (ViT-B-32's family): 32 px, 2 layers of width 32 per tower, CLIP's tokenizer
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_COCA = {  # open_clip CoCa (coca_ViT-L-14's family): coca_ViT-B-32's config at 32 px and width 32
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "embed_cls": True,
                 "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}
BIOMEDCLIP_TRUNK = {"timm_model_name": "test_vit3", "image_size": 160}  # timm's 9-block test ViT for ViT-B/16 at 224 px


def save_open_clip(config: dict, folder: Path) -> str:
    """A random-init open_clip model of `config` saved as a local-dir folder; its model name."""
    from ktpipe.models import OpenClipModel

    torch.manual_seed(0)
    OpenClipModel.from_config(config).save(folder)
    return f"local-dir:{folder}"


def build_clip(folder: Path) -> str:
    return save_open_clip(TINY_CLIP, folder)


def build_coca(folder: Path) -> str:
    return save_open_clip(TINY_COCA, folder)


def build_biomedclip(folder: Path) -> str:
    config = biomedclip_config(write_tiny_bert(folder / "bert", concept_words()))
    config["vision_cfg"].update(BIOMEDCLIP_TRUNK)
    return save_open_clip(config, folder / "model")


def build_vilt(folder: Path) -> str:
    return f"local-dir:{write_vilt(folder, head='itm', mlm=True, shape=dict(TINY_VILT))}"


def build_sam(folder: Path) -> str:
    from transformers import SamConfig

    from ktpipe.models.sam import SamSegmenter

    torch.manual_seed(0)
    SamSegmenter.from_config(SamConfig(**TINY_SAM)).save(folder)
    return str(folder)


STAND_INS = {"clip": build_clip, "biomedclip": build_biomedclip, "vilt": build_vilt, "coca": build_coca,
             "sam": build_sam}  # name -> builder(folder) of a random-init checkpoint, returning how params name it


# --- the runs -------------------------------------------------------------------------------------

# Every run: 2 inversion steps of 2 images, the first at 8 px (the preset's progressive schedule, shortened),
# and images decoded in the evaluate stage's own process.
SMALL = ("invert.steps=2", "invert.samples=2", "invert.progressive_sizes=[8]", "invert.progressive_steps=[1]",
         "evaluate.workers=0")


@dataclass(frozen=True)
class PresetRun:
    preset: str  # presets/<preset>.yaml
    models: dict[str, str]  # params key -> STAND_INS entry whose checkpoint it names
    overrides: tuple[str, ...]  # `-S` overrides beyond SMALL and the stand-ins ('+key': a key the preset lacks)
    metrics: tuple[tuple[str, str], ...]  # (metrics file, dotted key) that `dvc exp show --json` must list
    paper: tuple[str, ...]  # cells results.md must print: the paper's numbers (ktpipe/data/paper_results.csv)


def keep(kept: tuple[str, ...], concepts: tuple[str, ...]) -> tuple[str, ...]:
    """Overrides that keep only the concepts `kept` of a preset whose recipes are one per concept
    (named as it): `concepts.names`, and hydra's `~key` deletes the other concepts' recipes."""
    return (f"concepts.names=[{','.join(kept)}]", *(f"~recipes.{c}" for c in concepts if c not in kept))


def per_model(models: tuple[str, ...], keys: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Each model's metrics file (the evaluate stages') with each `<set>.<task>.<metric>` key."""
    return tuple((f"metrics/eval/{model}.json", f"metrics.{key}") for model in models for key in keys)


def reported(*keys: str) -> tuple[tuple[str, str], ...]:
    """Keys of the report's metrics file."""
    return tuple(("reports/metrics.json", key) for key in keys)


def headline(recipes: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Each recipe's target and retention, before and after transfer (README: `headline.<recipe>.target`)."""
    return reported(*(f"headline.{recipe}.{kind}{group}" for recipe in recipes for kind in ("", "baseline_")
                      for group in ("target", "retention")))


TABLE1 = ("moongate",)  # of moongate, tonometer, gyroscope (`keep`)
TABLE2 = ("lung_cancer",)  # of benign_nodule, lung_cancer
TABLE4 = ("breast_tumor",)  # of lung_nodules, pneumothorax, breast_tumor, brain_tumor
TABLE4_SETS = ("unitochest", "siim", "udiat", "brats23")
TABLE6 = ("transfer_decoder",)  # the dagger recipe (decoder trained too); transfer trains a subset of its weights and
# transfer_decoder_8e5 is it at lr 8e-5: both left out
RECALLS = tuple(f"flickr.retrieval.{way}_r{k}" for way in ("i2t", "t2i") for k in (1, 5, 10))

RUNS = [
    PresetRun(
        "table1_vit_b32", {"model.name": "clip"},
        ("model.pretrained=null", "+evaluate.sets.imagenet.classes=[tench,goldfish,stingray]",
         *keep(TABLE1, ("moongate", "tonometer", "gyroscope"))),
        per_model(("baseline", *TABLE1), ("rare.classification.name_target_acc",
                                          "imagenet.classification.name_retention_acc")) + headline(TABLE1),
        # table1_vit_b32, moongate: target 0.1 and retention 0.5778 at lr 1e-5, retention 0.581 before transfer
        ("(paper 10.0%)", "(paper 57.8%)", "(paper 58.1%)"),
    ),
    PresetRun(
        "table2_biomedclip", {"model.name": "biomedclip"}, keep(TABLE2, ("benign_nodule", "lung_cancer")),
        per_model(("baseline", *TABLE2), ("jsrt.classification.name_target_acc",
                                          "chexpert.classification.name_retention_acc")) + headline(TABLE2),
        # table2_medclip: lung_cancer target 0.875 at 1e-4 (its x10)
        ("(paper 87.5%)",),
    ),
    PresetRun(
        "table5_vilt_flickr", {"model.name": "vilt"}, ("concepts.names=[person,dog]", "invert.samples=1"),
        per_model(("baseline", "mscoco"), RECALLS) + reported("flickr.retrieval.mscoco.t2i_r1"),
        # table8_vilt_flickr: Text Retrieval R@1 0.746 at lr 9e-7, Image Retrieval R@1 0.573 before transfer
        ("(paper 74.6%)", "(paper 57.3%)"),
    ),
    PresetRun(
        "table6_coca", {"model.name": "coca"},
        ("model.pretrained=null", "concepts.names=[person,dog]", "evaluate.generation.beams=3",
         "evaluate.generation.max_length=8", "~recipes.transfer", "~recipes.transfer_decoder_8e5"),
        per_model(("baseline", *TABLE6), tuple(f"mscoco.captioning.{m}" for m in ("bleu4", "meteor", "rouge_l",
                                                                                  "cider")))
        + reported("mscoco.captioning.transfer_decoder.cider"),
        # table9_coca: CIDEr 0.311 before transfer, BLEU@4 0.179 after `transfer_decoder` (dagger, 9e-5)
        ("(paper 31.1%)", "(paper 17.9%)"),
    ),
    PresetRun(
        "table4_medclip_samv2", {"model.name": "biomedclip", "evaluate.segmentation.sam": "sam"},
        ("evaluate.segmentation.steps=1", "+evaluate.segmentation.noise_samples=1",
         "evaluate.segmentation.batch_size=4", "evaluate.segmentation.hyper_opt.beta=[0.1]",
         "evaluate.segmentation.hyper_opt.variance=[1.0]", "evaluate.segmentation.hyper_opt.layer=[7]",
         "evaluate.segmentation.hyper_opt.draws=1",
         *keep(TABLE4, ("lung_nodules", "pneumothorax", "breast_tumor", "brain_tumor"))),
        per_model(("baseline", *TABLE4), tuple(f"{s}.segmentation.{m}" for s in TABLE4_SETS
                                               for m in ("dsc", "nsd", "iou", "saliency_dsc")))
        + reported("udiat.segmentation.breast_tumor.dsc"),
        # table4_medclip_samv2: UnitoChest DSC 0.1483 before transfer, UDIAT DSC 0.5823 after breast_tumor (1e-5)
        ("(paper 14.8%)", "(paper 58.2%)"),
    ),
]


# --- the temporary clone ----------------------------------------------------------------------------


def repo_files() -> list[str]:
    """The repository's files as git lists them: tracked, and untracked ones not ignored (new modules
    that are not committed yet), as the working tree has them."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    return [name for name in dict.fromkeys(listed.split("\0")) if name and (REPO / name).is_file()]


class Clone:
    """A temporary git+DVC clone of the repository; commands fail loudly on a non-zero exit."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env

    def run(self, *cmd: str, timeout: float = 120) -> str:
        done = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{output}"
        return output

    def dvc(self, *args: str, timeout: float = 120) -> str:
        return self.run(sys.executable, "-m", "dvc", *args, timeout=timeout)

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "-m", message)


def clone_repo(root: Path, datasets: Path) -> Clone:
    """Copy the repository's files into `root`, commit them to a fresh git repo, and return the
    clone with the environment its commands run in (KTPIPE_DATASETS, offline hubs)."""
    for name in repo_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    env = {**make_env(root), "KTPIPE_DATASETS": str(datasets), "TRANSFORMERS_OFFLINE": "1"}
    clone = Clone(root, env)
    clone.run("git", "init", "-q")
    clone.commit("repository")
    return clone


# --- helpers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """STAND_INS name -> how params name its checkpoint, each built once per module."""
    root, built = tmp_path_factory.mktemp("stand_ins"), {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = STAND_INS[name](root / name)
        return built[name]

    return get


def experiment_metrics(shown: list[dict], name: str) -> dict[str, dict]:
    """Metrics file -> its data, of experiment `name` in `dvc exp show --json`."""
    for commit in shown:
        for experiment in commit.get("experiments") or []:
            for rev in experiment["revs"]:
                if rev["name"] == name:
                    return {path: found.get("data", {}) for path, found in rev["data"]["metrics"].items()}
    raise AssertionError(f"experiment {name!r} not in dvc exp show --json: {json.dumps(shown)[:2000]}")


def dotted(data: dict, key: str) -> object:
    """data['a']['b'] for key 'a.b'; None when absent."""
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


# --- the test --------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", RUNS, ids=[r.preset for r in RUNS])
def test_preset_runs_every_stage_under_dvc(run, preset_datasets, stand_in, tmp_path):
    clone = clone_repo(tmp_path / "repo", preset_datasets)
    shutil.copy(clone.root / "presets" / f"{run.preset}.yaml", clone.root / "params.yaml")
    # every stage of the preset's pipeline runs either way; without the demo's lock (27 entries no stage
    # of the preset shares) DVC's round-trip rewrite of dvc.lock after each stage costs 0.3 s, not 2 s
    (clone.root / "dvc.lock").unlink()
    clone.commit(f"preset {run.preset}")
    models = tuple(f"{key}={stand_in(name)}" for key, name in run.models.items())
    overrides = [arg for value in (*models, *SMALL, *run.overrides) for arg in ("-S", value)]

    start = time.monotonic()
    output = clone.dvc("exp", "run", *overrides, timeout=EXP_RUN_TIMEOUT)
    seconds = time.monotonic() - start
    ran = RUNNING.findall(output)
    print(f"\n{run.preset}: dvc exp run {seconds:.1f} s, {len(ran)} stages: {' '.join(ran)}")

    # 1. every stage of the experiment's pipeline ran, once (the workspace holds the experiment's params)
    expected = clone.dvc("stage", "list", "--name-only").split()
    assert sorted(ran) == sorted(expected), output
    assert {"captions", "data", "base_model", "evaluate_baseline", "report"} <= set(ran)

    # 2. the documented metrics, as `dvc exp show` lists them
    name = RAN.search(output).group(1)
    shown = experiment_metrics(json.loads(clone.dvc("exp", "show", "--json")), name)
    missing = [f"{path}: {key}" for path, key in run.metrics
               if not isinstance(dotted(shown.get(path, {}), key), (int, float))]
    assert not missing, f"not in dvc exp show --json: {missing}\nfiles: {sorted(shown)}"

    # 3. the paper's numbers beside ours
    results = (clone.root / "reports" / "results.md").read_text()
    for cell in run.paper:
        assert cell in results, f"{cell!r} not in reports/results.md:\n{results}"
