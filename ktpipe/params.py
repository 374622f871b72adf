"""Typed parameters: one frozen dataclass per `params.yaml` section.

`load_params` reads YAML 1.2 (so `dvc exp run -S lr=2e-5`, which writes `2e-05`, is a float)
and rejects unknown keys and wrong types with a message that names the offending key.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from ktpipe.errors import InputMissingError, KtpipeError


class ParamsError(KtpipeError):
    """A params file is malformed: unknown key, wrong type or out-of-range value."""


@dataclass(frozen=True)
class ModelParams:
    backend: str = "demo"  # registry key in ktpipe.models.BACKENDS (demo, open_clip, vilt)
    name: str = "ktpipe-demo"  # open_clip architecture, 'local-dir:<path>' or 'hf-hub:<id>'
    pretrained: str | None = None  # pretrained tag, or a local checkpoint file or folder
    device: str = "auto"  # auto picks cuda when available, else cpu


@dataclass(frozen=True)
class WorldParams:
    image_size: int = 32  # side of the rendered demo images, in pixels
    val_per_concept: int = 20  # validation renders per concept (used to pick lr)
    test_per_concept: int = 50  # test renders per concept (only reported)


@dataclass(frozen=True)
class PretrainParams:
    steps: int = 450  # optimizer steps of demo pretraining
    batch_size: int = 256  # image-text pairs per step
    lr: float = 1.0e-3  # peak AdamW learning rate (cosine schedule after warmup)
    warmup: int = 30  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW weight decay
    concept_fraction: float = 0.3  # share of each batch that shows a known named concept
    definition_fraction: float = 0.2  # described renders captioned "A X is a <description>." (made-up X)
    name_objective: bool = True  # text-only objective "a photo of a X." <-> "A X is a ..."
    name_batch: int = 128  # made-up names per text-only step
    name_weight: float = 1.0  # weight of the text-only objective
    freeze_token_embedding: bool = True  # keep token embeddings at their random init
    pool_size: int = 0  # renders made once and drawn from every step (0: render every batch anew)
    candidates: int = 6  # demo cross-encoder: captions each render is matched against (its own first)
    mlm_weight: float = 0.0  # demo cross-encoder: weight of masked language modelling
    known_definitions: float = 0.0  # demo cross-encoder: share of named renders captioned "A <name> is <description>."
    init_from: str | None = None  # demo ViLT and CoCa: the demo CLIP checkpoint they start from (ViLT: its vision
    # tower; CoCa: its vision blocks and text tower)
    caption_weight: float = 0.1  # demo CoCa: weight of the captioning loss beside the contrastive one (weight 1)


# The paper's description prompt (Sec. 4.2); '{name}' is replaced with the concept's name.
PAPER_PROMPT = (
    "Generate a small description of the ImageNet class {name} without using the word itself. "
    "The description must contain visual cues useful for recognizing the subject with low-level and "
    "accurate details. Please don't insert anything else in the response except the description."
)


@dataclass(frozen=True)
class GeneratorParams:
    model: str = ""  # transformers model id or local folder of an instruction LLM (chat template)
    prompt: str = PAPER_PROMPT  # user message; '{name}' becomes the concept name
    max_new_tokens: int = 120  # generation budget per description
    do_sample: bool = False  # false: greedy decoding; true: sampling seeded with `seed`
    temperature: float = 0.7  # sampling only
    top_p: float = 0.9  # sampling only
    seed: int = 0  # sampling seed (per concept, as concepts.concept_seed derives it)
    device: str = "auto"  # auto picks cuda when available
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    trust_remote_code: bool = False  # never on by default: it runs code from the model repository


@dataclass(frozen=True)
class ConceptsParams:
    names: tuple[str, ...] = ()  # concepts to invert and learn, each described in `file` (or `generated`)
    file: str = "captions/demo.yaml"  # concept descriptions of this experiment
    generated: str = "captions/generated.yaml"  # LLM descriptions of concepts `file` leaves undescribed
    generator: GeneratorParams | None = None  # null: every concept needs a description in `file`
    truncate: bool = False  # false: a text longer than the text tower's context is an error; true: warn and cut


@dataclass(frozen=True)
class InvertParams:
    steps: int = 5000  # optimization steps per concept (paper: 5k)
    lr: float = 0.1  # peak Adam learning rate on pixels (cosine annealed to 0)
    samples: int = 10  # images per concept, optimized together as one batch
    image_size: int | None = None  # None: the model's input size
    tv_weight: float = 0.005  # alpha of the total-variation penalty (paper Eq. 3)
    affine_p: float = 0.5  # probability that a sample gets a random affine each step
    rotation: float = 30.0  # max rotation, degrees (uniform in [-rotation, rotation])
    translate: float = 0.1  # max translation, fraction of the image side
    scale_min: float = 0.7  # scale range of the random affine
    scale_max: float = 1.0
    grad_clip: float | None = None  # max L2 norm of each step's pixel gradient (authors' code: 1.0)
    progressive: bool = False  # optimize at low resolution first, then upsize (authors' code)
    progressive_sizes: tuple[int, ...] = (64, 128)  # sides before the model's own size is reached
    progressive_steps: tuple[int, ...] = (900, 1800)  # step at which each next size starts
    similarity: str = "cosine"  # cosine (paper Eq. 3) or l2: minus the L2 distance of raw embeddings (authors' BiomedCLIP code)
    reduction: str = "sum"  # sum or mean of the per-sample objective over the batch (authors' code: mean)
    padding: str = "zeros"  # fill outside an affine-moved image: zeros, or border (authors' code)
    interpolation: str = "bilinear"  # resizing to the model and between progressive sizes: bilinear or bicubic (authors')
    init: str = "uniform"  # starting pixels: uniform noise, or normal: N(0.5, 0.5^2) clamped to [0, 1], i.e. after
    # ViLT's normalization the paper's N(0, 1) (Sec. 4.3) clamped to [-1, 1] (std 0.72)
    concepts_per_batch: int = 1  # concepts optimized in one batch (concepts x samples images per forward pass): 1 runs each
    # on its own (bit-identical to a run of that concept alone); more fill a GPU, each concept keeping its own seed,
    # augmentations, gradient clip and loss, equal to its own run within float rounding (docs/cli.md)
    precision: str = "fp32"  # fp32, or bf16 / fp16: the model's forward passes under autocast (GPU tensor cores;
    # ktpipe/precision.py), the pixels and their Adam in fp32
    compile: str | None = None  # torch.compile backend of the model's towers (ktpipe/precision.py): null (off), inductor
    # (fused GPU kernels; on a CPU it compiles C++ for a minute first), or any of torch._dynamo.list_backends()


@dataclass(frozen=True)
class FinetuneParams:
    epochs: int = 1  # passes over the inverted images
    batch_size: int = 4  # images per step (paper: 4)
    weight_decay: float = 0.2  # paper: 0.2 for CLIP models
    optimizer: str = "adamw"  # adamw (decoupled decay, as CLIP) or adam (L2 decay)
    betas: tuple[float, ...] = (0.9, 0.999)  # Adam betas (torch's default; authors' code: 0.9, 0.98)
    eps: float = 1.0e-8  # Adam epsilon (torch's default; authors' code: 1e-6)
    loss: str = "eq2"  # eq2: each image against the recipe's captions (needs >= 2); authors: image+caption batch
    # InfoNCE; itm: image-text matching, other concepts' captions as mismatches; mlm: masked words (cross-encoders)
    towers: str = "visual"  # which towers train: visual, text or both (paper Fig. 4)
    visual_layers: int | None = None  # train only the last N visual blocks + head (None: whole tower)
    rehearsal: bool = False  # also fine-tune on inverted images of known concepts (beyond the paper)
    name_prefix: bool = True  # caption "A <name> is <description>." (False: description only, Fig. 5)
    temperature: float | None = None  # InfoNCE temperature (logits = cosine / temperature); None: the model's own
    kd_weight: float = 0.0  # weight of the MSE between fine-tuned and frozen base image embeddings (authors' code)
    lora_rank: int = 0  # LoRA through peft (ktpipe/transfer/lora.py): rank of the adapters on the trained towers' linear
    # layers named by lora_targets, merged into the weights on save (0: off, every weight of the towers trains)
    lora_alpha: float = 16.0  # LoRA scale: the update is B A * lora_alpha / lora_rank
    lora_targets: tuple[str, ...] = ("c_fc", "c_proj")  # names (last part) of the linear layers that get adapters
    l2sp_weight: float = 0.0  # L2-SP (Li et al. 2018): weight of half the squared distance of the trained weights to the
    # base model's, added to the loss, a pull toward the starting point against forgetting (0: off)
    pixels: str = "raw"  # inverted images as optimized (raw floats), or minmax_png: per-image min-max scaled 8-bit (authors')
    concepts: tuple[str, ...] | None = None  # learn only these novel concepts (None: every novel one)
    images: str = "inverted"  # inverted, or noise: uniform random images (ablation baseline)
    lr_multiplier: float = 1.0  # this recipe trains at lr * lr_multiplier (paper Table 2's base lrs)
    contrastive_weight: float = 1.0  # coca: lambda1, weight of the InfoNCE (paper Sec. 8.8: 1)
    caption_weight: float = 0.1  # coca: lambda2, weight of the captioning loss (paper Sec. 8.8: 0.1)
    target_captions: str = "coca_targets"  # coca: templates of the captions the decoder learns ('{}' is the
    # concept's name; paper Sec. 8.8's 26), a packaged name in ktpipe/data/templates/ or a .txt file
    decoder: bool = False  # also train a captioner's text decoder (paper Table 9's dagger rows)
    swapped_names: bool = False  # itm: also mismatch each learned description under another concept's name (beyond
    # the paper: a cross-encoder tells the captions apart by description alone, and may never read the new name)
    precision: str = "fp32"  # fp32, or bf16 / fp16: forward passes under autocast, fp16 with a loss scaler; weights
    # and optimizer state stay fp32 (ktpipe/precision.py)


DATASET_FORMATS = ("demo", "folder", "manifest", "imagenet", "imagenet100", "chexpert5x200", "jsrt", "karpathy",
                   "captions", "masks")


@dataclass(frozen=True)
class RerankParams:
    k: int = 16  # candidates per query (a caption's images, an image's captions) that the cross-encoder rescores
    model: ModelParams = field(default_factory=ModelParams)  # the dual encoder proposing them by cosine similarity


@dataclass(frozen=True)
class DatasetParams:
    task: str = "classification"  # evaluation task (ktpipe.eval.TASKS); metrics land under <set>.<task>.<metric>
    format: str = "folder"  # one of DATASET_FORMATS (docs/datasets.md documents each layout)
    root: str | None = None  # dataset folder; relative image paths resolve under it
    labels: str | None = None  # label file: manifest CSV/parquet, CheXpert CSV or JSRT CLNDAT file
    split: str = "test"  # demo world: val or test; karpathy: the split file's test, val, train or restval
    subset: int | None = None  # deterministic class-balanced subset of this many images (None: all)
    classes: tuple[str, ...] = ()  # keep only these classes (empty: all the dataset has)
    extra_classes: tuple[str, ...] = ()  # other sets whose classes are also candidates (e.g. imagenet)
    templates: str | None = None  # prompt templates for this set (None: evaluate.templates)
    rerank: RerankParams | None = None  # retrieval with a cross-encoder: rescore a dual encoder's top k (None: all pairs)
    prompt: str | None = None  # segmentation: one prompt for every image (the paper's P1-P4); None: templates over the class name
    spacing: tuple[float, ...] = ()  # segmentation: pixel size (rows, columns), or one value for both; empty: 1 pixel


@dataclass(frozen=True)
class GenerationParams:
    """Caption decoding (open_clip's CoCa.generate settings, under its names)."""

    method: str = "beam_search"  # open_clip (CoCa.generate's default: group beam search on logits), beam_search
    # (ktpipe's: one group, on log-probabilities), or sampling: top_k or top_p
    beams: int = 6  # beam searches: hypotheses kept per image (open_clip's num_beams, 6)
    beam_groups: int = 3  # open_clip: beams split into groups that search apart (num_beam_groups, 3; no diversity penalty)
    max_length: int = 30  # tokens per caption, start and end tokens included (open_clip's seq_len)
    min_length: int = 5  # no end token before this many tokens (open_clip's min_seq_len)
    repetition_penalty: float = 1.0  # transformers' RepetitionPenaltyLogitsProcessor (1: none)
    length_penalty: float = 1.0  # beam searches: a finished caption scores its summed score / length ** this
    temperature: float = 1.0  # beam_search and sampling: logits divided by this before the softmax (open_clip: unused)
    top_k: int = 1  # top_k sampling: tokens kept
    top_p: float = 0.1  # top_p sampling: probability mass kept
    seed: int = 0  # sampling seed


@dataclass(frozen=True)
class SaliencySearchParams:
    """MedCLIP-SAMv2's `--hyper-opt` (saliency_maps/generate_saliency_maps.py, which zeroshot.sh runs):
    every (beta, variance, layer) of the grid scored by the mean DSC of its saliency masks on a
    validation set, the best (the first in grid order on ties) then segmenting the test set."""

    sets: dict[str, str] = field(default_factory=dict)  # segmentation set -> the evaluate.sets entry searched for it
    # (its validation images, prompted as the set is); sets not listed segment with the fixed beta, variance, layer
    beta: tuple[float, ...] = (0.1, 1.0, 2.0)  # M2IB betas tried (MedCLIP-SAMv2's grid)
    variance: tuple[float, ...] = (0.1, 1.0, 2.0)  # M2IB noise variances tried (MedCLIP-SAMv2's grid)
    layer: tuple[int, ...] = (7, 8, 9)  # vision blocks tried (MedCLIP-SAMv2's grid)
    draws: int | None = 3  # images scored per setting: draw i picks one validation image with a non-empty mask
    # by Python's random.Random(i), repeats possible (MedCLIP-SAMv2's 3 draws); null: every such image once
    threshold: float = 0.3  # a validation mask is the [0, 1] saliency map above this, unfiltered (MedCLIP-SAMv2: 0.3)


@dataclass(frozen=True)
class SegmentationParams:
    """Zero-shot segmentation as MedCLIP-SAMv2 does it: a text-prompted saliency map of the vision
    tower, post-processed to a coarse mask, optionally refined by SAM prompted with its boxes."""

    saliency: str = "m2ib"  # m2ib (information bottleneck attribution) or gradient (gradient x input, the baseline)
    layer: int = 7  # vision block (0-based) whose output tokens the saliency reads (7: MedCLIP-SAMv2's argparse
    # default, which its zero-shot run replaces by the grid search's pick of 7, 8 or 9: `hyper_opt`)
    beta: float = 0.1  # M2IB: weight of the bottleneck's KL term (0.1: its argparse default; `hyper_opt` searches it)
    variance: float = 1.0  # M2IB: variance of the bottleneck's noise (1: its argparse default; `hyper_opt` searches it)
    steps: int = 10  # M2IB: optimization steps of the bottleneck mask (fixed at 10 in MedCLIP-SAMv2's code)
    lr: float = 1.0  # M2IB: Adam learning rate of the bottleneck mask (fixed at 1 in MedCLIP-SAMv2's code)
    noise_samples: int = 10  # M2IB: noisy copies of each image per step (the reference's 10; the main cost)
    batch_size: int = 16  # images whose saliency maps are computed together
    postprocess: str = "kmeans"  # saliency -> mask: threshold (fixed), otsu, or kmeans (2 clusters)
    threshold: float = 0.5  # postprocess threshold: foreground where the min-max scaled saliency exceeds this
    components: int = 1  # keep the K largest connected components; each gives SAM one box prompt
    sam: str | None = None  # SAM (transformers SamModel) hub id or local folder: score SAM's mask; None: the saliency mask
    nsd_tolerance: float = 2.0  # NSD boundary tolerance, in the set's spacing units (pixels for a set without spacing)
    seed: int = 0  # M2IB: seed of the noise the bottleneck mixes in
    hyper_opt: SaliencySearchParams | None = None  # grid search of beta, variance and layer per set; null: off


@dataclass(frozen=True)
class EvaluateParams:
    templates: str = "demo"  # prompt-template file in ktpipe/data/templates/ (or a path)
    batch_size: int = 128  # images per forward pass
    workers: int = 0  # image-decoding worker threads (0: decode in the main thread)
    pin_memory: bool = False  # decoded images in page-locked memory: a faster, asynchronous copy to a GPU (with workers)
    precision: str = "fp32"  # fp32, or bf16 / fp16: every task's forward passes under autocast (ktpipe/precision.py)
    compile: str | None = None  # torch.compile backend of the model's towers: null (off), inductor, ... (as invert.compile)
    wise_alphas: tuple[float, ...] = ()  # WiSE-FT (Wortsman et al. 2022): each recipe's model is also evaluated with its
    # weights at base + alpha (fine-tuned - base) for each alpha in [0, 1], no retraining (metrics under `wise.<alpha>`)
    sets: dict[str, DatasetParams] = field(default_factory=dict)  # evaluation sets, by name
    use: tuple[str, ...] | None = None  # the sets this model evaluates (None: every set); a family picks its own
    generation: GenerationParams = field(default_factory=GenerationParams)  # captioning sets: how captions are decoded
    spice: bool = True  # captioning sets: also score SPICE (Stanford CoreNLP, which pycocoevalcap downloads on first use)
    segmentation: SegmentationParams = field(default_factory=SegmentationParams)  # segmentation sets: saliency, masks, SAM


@dataclass(frozen=True)
class ReportParams:
    paper: str | None = None  # experiment key in ktpipe/data/paper_results.csv printed beside ours
    target_set: str | None = None  # set whose novel classes give the headline target accuracy (None: first)
    retention_set: str | None = None  # set whose other classes give the headline retention (None: last)


@dataclass(frozen=True)
class DistributedParams:
    nproc_per_node: int = 1  # processes of the invert, finetune and evaluate stages on this machine: above 1 a stage
    # runs itself under torchrun (one GPU each, NCCL; gloo on a CPU): inversion shares out concepts, evaluation image
    # batches, fine-tuning runs DDP over each batch (ktpipe/distributed.py). How a stage runs, not what it computes:
    # no stage depends on it


@dataclass(frozen=True)
class Params:
    seed: int = 0  # seeds world renders, pretraining, inversion and fine-tuning
    lr: float = 1.0e-4  # fine-tuning learning rate (top level so `dvc exp run -S lr=...` works)
    model: ModelParams = field(default_factory=ModelParams)
    world: WorldParams = field(default_factory=WorldParams)
    pretrain: PretrainParams = field(default_factory=PretrainParams)
    concepts: ConceptsParams = field(default_factory=ConceptsParams)
    invert: InvertParams = field(default_factory=InvertParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> finetune overrides
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    report: ReportParams = field(default_factory=ReportParams)
    distributed: DistributedParams = field(default_factory=DistributedParams)
    inverted: tuple[str, ...] | None = None  # concepts the invert stages run for (None: every concepts.names entry)
    families: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> a second model family, as a
    # merge patch of this file (FAMILY_KEYS); its stages run with `--family <name>` (docs/models.md)

    def recipe(self, name: str) -> FinetuneParams:
        """The finetune section with a recipe's overrides applied."""
        if name not in self.recipes:
            raise ParamsError(f"unknown recipe {name!r}; params.yaml defines {sorted(self.recipes)}")
        overrides = self.recipes[name] or {}
        if not isinstance(overrides, dict):
            raise ParamsError(f"params key 'recipes.{name}' must be a mapping of finetune overrides, got {overrides!r}")
        merged = {**dataclasses.asdict(self.finetune), **overrides}
        return build_section(FinetuneParams, merged, f"recipes.{name}")

    def recipe_lr(self, name: str) -> float:
        """The learning rate a recipe trains at: `lr` times the recipe's `lr_multiplier`."""
        return self.lr * self.recipe(name).lr_multiplier

    def inverted_names(self) -> tuple[str, ...]:
        """The concepts inverted for this model: `inverted`, or every concept."""
        return self.concepts.names if self.inverted is None else self.inverted

    def evaluated_sets(self) -> dict[str, DatasetParams]:
        """Every evaluation set, the data stage writes them all (families pick theirs with `evaluate.use`)."""
        return dict(self.evaluate.sets)

    def models(self) -> tuple[str, ...]:
        """The evaluated models: the one before transfer (`baseline`) and every recipe's."""
        return ("baseline", *self.recipes)

    def used_sets(self) -> dict[str, DatasetParams]:
        """The sets this model evaluates: `evaluate.use`, or every set."""
        use = self.evaluate.use
        return dict(self.evaluate.sets) if use is None else {name: self.evaluate.sets[name] for name in use}

    def family(self, name: str) -> "Params":
        """The params of model family `name`: this file with `families.<name>` applied as a JSON
        merge patch (RFC 7386: mappings merge key by key, null restores a key's default, anything
        else replaces), validated like the file itself. A family's `recipes` replace the file's."""
        if name not in self.families:
            raise ParamsError(f"unknown model family {name!r}; params key 'families' defines {sorted(self.families)}")
        patch = self.families[name]
        if not isinstance(patch, dict):
            raise ParamsError(f"params key 'families.{name}' must be a mapping of overrides, got {patch!r}")
        unknown = sorted(set(patch) - set(FAMILY_KEYS))
        if unknown:
            raise ParamsError(f"params key(s) {[f'families.{name}.{k}' for k in unknown]}: a family may override "
                              f"{list(FAMILY_KEYS)} only (the world, concepts, inversions and seed are shared)")
        missing = [key for key in FAMILY_OWN_KEYS if key not in patch]
        if missing:
            raise ParamsError(f"params key(s) {[f'families.{name}.{k}' for k in missing]} missing: a family sets its "
                              f"own {list(FAMILY_OWN_KEYS)} (its stages depend on its section, not the file's)")
        if "sets" in (patch.get("evaluate") or {}):
            raise ParamsError(f"params key 'families.{name}.evaluate.sets': a family picks sets of the file's "
                              f"evaluate.sets with 'evaluate.use' (the data stage writes every set once)")
        base = {key: value for key, value in dataclasses.asdict(self).items() if key != "families"}
        base["pretrain"] = {}  # a family's pretraining is its own (its base model stage depends on that alone)
        if "recipes" in patch:  # a family's recipes are its own (dvc.yaml runs one stage per entry)
            base["recipes"] = {}
        try:
            return validate(build_section(Params, merge_patch(base, patch)))
        except ParamsError as err:
            raise ParamsError(f"in params section 'families.{name}': {err}") from err


# What a model family may override: everything that depends on the model, nothing that defines the
# concepts, the inverted images or the evaluation data (their stages run once for every family: a
# family fine-tunes on the file's model's inverted images and picks its sets with evaluate.use, and the
# report's target and retention sets among them with `report`).
FAMILY_KEYS = ("lr", "model", "pretrain", "finetune", "recipes", "evaluate", "report")
FAMILY_OWN_KEYS = ("lr", "model", "pretrain", "recipes")  # never inherited (pretrain: null for a real model): the
# file's own belong to the file's model, and dvc.yaml names families.<name>.model and .pretrain


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: mappings merge key by key, null deletes a key, anything else
    replaces. A deleted params key takes its default."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


# Keys that an older params file may still hold: section class -> old key -> what to write instead.
RENAMED: dict[str, dict[str, str]] = {
    "Params": {"captions": "the section is now 'concepts' (file, generated, generator, truncate), and the "
                           "list of concepts moved into it as 'concepts.names'"},
    "PretrainParams": {"vision_init": "use 'init_from' (the demo CLIP checkpoint a demo ViLT or CoCa starts from)"},
    "FinetuneParams": {"logit_scale": "use 'temperature' (its inverse: logit_scale 3 is temperature 0.3333)"},
    "EvaluateParams": {"models": "delete it: the evaluate stages run for the model before transfer (evaluate_baseline) "
                                 "and for every recipe of 'recipes' (evaluate@<recipe>), each named once"},
}

CHOICES: dict[str, tuple[str, ...]] = {  # string params with a fixed set of values
    "towers": ("visual", "text", "both"),
    "optimizer": ("adam", "adamw"),
    "images": ("inverted", "noise"),
    "loss": ("eq2", "authors", "itm", "mlm", "coca"),
    "method": ("open_clip", "beam_search", "top_k", "top_p"),
    "init": ("uniform", "normal"),
    "pixels": ("raw", "minmax_png"),
    "similarity": ("cosine", "l2"),
    "reduction": ("sum", "mean"),
    "padding": ("zeros", "border"),
    "interpolation": ("bilinear", "bicubic"),
    "saliency": ("m2ib", "gradient"),
    "postprocess": ("threshold", "otsu", "kmeans"),
    "precision": ("fp32", "bf16", "fp16"),
}


def check_choices(section: Any, prefix: str) -> None:
    """Every string field named in CHOICES holds one of its allowed values."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.name in CHOICES and value not in CHOICES[f.name]:
            raise ParamsError(f"params key '{prefix}.{f.name}' must be one of {list(CHOICES[f.name])}, got {value!r}")


def _check_value(value: Any, hint: Any, key: str) -> Any:
    """Return `value` coerced to `hint` or raise ParamsError naming `key`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], key)
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"params key '{key}' must be a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"params key '{key}' must be a mapping, got {value!r}")
        item = typing.get_args(hint)[1]
        if dataclasses.is_dataclass(item):
            return {str(k): build_section(item, v, f"{key}.{k}") for k, v in value.items()}
        return {str(k): v for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"params key '{key}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"params key '{key}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"params key '{key}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ParamsError(f"params key '{key}' must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"params key '{key}' must be a string, got {value!r}")
        return value
    return value


def build_section(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params section '{prefix or cls.__name__}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for old in sorted(set(raw) & set(RENAMED.get(cls.__name__, {}))):
        where = f"{prefix}.{old}" if prefix else old
        raise ParamsError(f"params key '{where}' was renamed: {RENAMED[cls.__name__][old]}")
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"in section '{prefix}'" if prefix else "at top level"
        raise ParamsError(f"unknown params key(s) {unknown} {where}; known keys: {sorted(names)}")
    kwargs = {k: _check_value(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def validate(params: Params) -> Params:
    """Range checks that types alone cannot express."""
    positive = {
        "lr": params.lr,
        "invert.steps": params.invert.steps,
        "invert.lr": params.invert.lr,
        "invert.samples": params.invert.samples,
        "invert.concepts_per_batch": params.invert.concepts_per_batch,
        "finetune.epochs": params.finetune.epochs,
        "finetune.batch_size": params.finetune.batch_size,
        "pretrain.steps": params.pretrain.steps,
        "pretrain.batch_size": params.pretrain.batch_size,
        "world.val_per_concept": params.world.val_per_concept,
        "world.test_per_concept": params.world.test_per_concept,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ParamsError(f"params key '{key}' must be a positive number, got {value!r}")
    if not 0.0 <= params.invert.affine_p <= 1.0:
        raise ParamsError(f"params key 'invert.affine_p' must lie in [0, 1], got {params.invert.affine_p}")
    if not 0.0 < params.invert.scale_min <= params.invert.scale_max:
        raise ParamsError("params keys 'invert.scale_min' <= 'invert.scale_max' must be positive")
    names = params.concepts.names
    if len(set(names)) != len(names):
        raise ParamsError(f"params key 'concepts.names' lists a concept twice: {list(names)}")
    check_choices(params.evaluate, "evaluate")
    sections = [("finetune", params.finetune), *((f"recipes.{n}", params.recipe(n)) for n in params.recipes)]
    for prefix, section in sections:
        check_choices(section, prefix)
        if section.visual_layers is not None and section.visual_layers < 1:
            raise ParamsError(f"params key '{prefix}.visual_layers' must be a positive integer or null")
        if section.temperature is not None and not section.temperature > 0:
            raise ParamsError(f"params key '{prefix}.temperature' must be a positive number or null")
        if len(section.betas) != 2 or not all(0 <= b < 1 for b in section.betas):
            raise ParamsError(f"params key '{prefix}.betas' must be two numbers in [0, 1), got {list(section.betas)}")
        if not section.eps > 0:
            raise ParamsError(f"params key '{prefix}.eps' must be a positive number, got {section.eps!r}")
        for key in ("kd_weight", "weight_decay", "l2sp_weight"):
            if getattr(section, key) < 0:
                raise ParamsError(f"params key '{prefix}.{key}' must be zero or positive, got {getattr(section, key)!r}")
        for key in ("contrastive_weight", "caption_weight"):
            if getattr(section, key) < 0:
                raise ParamsError(f"params key '{prefix}.{key}' must be zero or positive, got {getattr(section, key)!r}")
        if section.loss == "coca" and section.decoder and section.caption_weight == 0:
            raise ParamsError(f"params key '{prefix}.decoder' trains the text decoder, but '{prefix}.caption_weight' "
                              "is 0, so no loss reaches it; give caption_weight (paper Sec. 8.8: 0.1) or decoder: false")
        if section.lora_rank < 0 or (section.lora_rank and not section.lora_alpha > 0):
            raise ParamsError(f"params keys '{prefix}.lora_rank' must be 0 (off) or positive and "
                              f"'{prefix}.lora_alpha' positive, got {section.lora_rank} and {section.lora_alpha}")
        if not section.lr_multiplier > 0:
            raise ParamsError(f"params key '{prefix}.lr_multiplier' must be a positive number")
        unknown = sorted(set(section.concepts or ()) - set(names))
        if unknown:
            raise ParamsError(f"params key '{prefix}.concepts' names {unknown}, which are not in 'concepts.names'")
    if params.pretrain.candidates < 2:
        raise ParamsError(f"params key 'pretrain.candidates' must be at least 2 (a caption and a mismatch), "
                          f"got {params.pretrain.candidates}")
    if not 0.0 <= params.pretrain.known_definitions <= 1.0:
        raise ParamsError(f"params key 'pretrain.known_definitions' must lie in [0, 1], "
                          f"got {params.pretrain.known_definitions}")
    if params.pretrain.mlm_weight < 0:
        raise ParamsError(f"params key 'pretrain.mlm_weight' must be zero or positive, got {params.pretrain.mlm_weight}")
    if params.pretrain.pool_size < 0:
        raise ParamsError(f"params key 'pretrain.pool_size' must be 0 (render every batch) or positive, "
                          f"got {params.pretrain.pool_size}")
    if params.pretrain.caption_weight < 0:
        raise ParamsError(f"params key 'pretrain.caption_weight' must be zero or positive, got {params.pretrain.caption_weight}")
    validate_invert(params.invert)
    if not all(0.0 <= a <= 1.0 for a in params.evaluate.wise_alphas) or \
            len(set(params.evaluate.wise_alphas)) != len(params.evaluate.wise_alphas):
        raise ParamsError(f"params key 'evaluate.wise_alphas' must list distinct numbers in [0, 1], "
                          f"got {list(params.evaluate.wise_alphas)}")
    for key, backend in (("invert.compile", params.invert.compile), ("evaluate.compile", params.evaluate.compile)):
        check_compile_backend(backend, key)
    validate_generation(params.evaluate.generation)
    validate_segmentation(params.evaluate.segmentation)
    validate_sets(params.evaluate.sets)
    validate_models(params)
    for key in ("target_set", "retention_set"):
        name = getattr(params.report, key)
        if name is not None and name not in params.evaluate.sets:
            raise ParamsError(f"params key 'report.{key}' names {name!r}, not one of evaluate.sets {sorted(params.evaluate.sets)}")
    check_device(params.model.device, "model.device")
    check_nproc(params.distributed.nproc_per_node, params.model.device)
    if params.concepts.generator is not None and not params.concepts.generator.model:
        raise ParamsError("params key 'concepts.generator.model' must name a transformers model id or folder")
    unknown = sorted(set(params.inverted or ()) - set(names))
    if unknown:
        raise ParamsError(f"params key 'inverted' names {unknown}, which are not in 'concepts.names'")
    for family in params.families:
        params.family(family)
    return params


def check_device(device: str, key: str) -> None:
    """`auto`, `cpu`, `mps`, `cuda` or `cuda:<index>`; a CUDA device must exist on this machine (torch is
    imported only to check one)."""
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise ParamsError(f"params key '{key}' is {device!r}; use auto, cpu, cuda, cuda:<index> or mps")
    if kind != "cuda":
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ParamsError(f"params key '{key}' is {device!r} but this machine has no CUDA device; "
                          "use auto (cuda where there is one, else cpu) or cpu")
    if index and int(index) >= count:
        raise ParamsError(f"params key '{key}' is {device!r} but this machine has {count} CUDA device(s) "
                          f"(cuda:0 to cuda:{count - 1})")


def check_compile_backend(backend: str | None, key: str) -> None:
    """null, or a backend torch.compile knows (torch is imported only to check one)."""
    if backend is None:
        return
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ParamsError(f"params key '{key}' is {backend!r}; use null (no torch.compile) or one of {known}")


def check_nproc(nproc: int, device: str) -> None:
    """At least one process; on CUDA at most one per GPU of this machine (NCCL gives each its own)."""
    if not (isinstance(nproc, int) and nproc >= 1):
        raise ParamsError(f"params key 'distributed.nproc_per_node' must be a positive integer, got {nproc!r}")
    if nproc == 1 or device == "cpu":
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count and nproc > count:
        raise ParamsError(f"params key 'distributed.nproc_per_node' is {nproc} but this machine has {count} CUDA "
                          f"device(s): one process per GPU, at most {count}")


def validate_invert(cfg: InvertParams) -> None:
    """Choices, the optional gradient clip and the progressive-resolution schedule."""
    check_choices(cfg, "invert")
    for key in ("tv_weight", "rotation", "translate"):
        if getattr(cfg, key) < 0:
            raise ParamsError(f"params key 'invert.{key}' must be zero or positive, got {getattr(cfg, key)!r}")
    if cfg.grad_clip is not None and not cfg.grad_clip > 0:
        raise ParamsError("params key 'invert.grad_clip' must be a positive number or null")
    if len(cfg.progressive_sizes) != len(cfg.progressive_steps):
        raise ParamsError("params keys 'invert.progressive_sizes' and 'invert.progressive_steps' must have equal length")
    if any(s <= 0 for s in cfg.progressive_sizes) or list(cfg.progressive_steps) != sorted(set(cfg.progressive_steps)):
        raise ParamsError("params 'invert.progressive_sizes' must be positive and 'progressive_steps' strictly increasing")


def validate_generation(cfg: GenerationParams) -> None:
    """Decoding settings a captioner can use."""
    check_choices(cfg, "evaluate.generation")
    for key in ("beams", "beam_groups", "max_length", "top_k"):
        if getattr(cfg, key) < 1:
            raise ParamsError(f"params key 'evaluate.generation.{key}' must be at least 1, got {getattr(cfg, key)}")
    if cfg.method == "open_clip" and cfg.beams % cfg.beam_groups:
        raise ParamsError(f"params key 'evaluate.generation.beam_groups' must divide beams ({cfg.beams}), "
                          f"got {cfg.beam_groups}")
    if not 0 <= cfg.min_length < cfg.max_length:
        raise ParamsError(f"params key 'evaluate.generation.min_length' must lie in [0, max_length) = "
                          f"[0, {cfg.max_length}), got {cfg.min_length}")
    for key in ("repetition_penalty", "temperature"):
        if not getattr(cfg, key) > 0:
            raise ParamsError(f"params key 'evaluate.generation.{key}' must be a positive number, got {getattr(cfg, key)}")
    if not 0 < cfg.top_p <= 1:
        raise ParamsError(f"params key 'evaluate.generation.top_p' must lie in (0, 1], got {cfg.top_p}")


def validate_segmentation(cfg: SegmentationParams) -> None:
    """Saliency and post-processing settings (the layer is checked against the model's depth when it runs)."""
    key = "evaluate.segmentation"
    check_choices(cfg, key)
    for name in ("steps", "noise_samples", "batch_size", "components"):
        if getattr(cfg, name) < 1:
            raise ParamsError(f"params key '{key}.{name}' must be at least 1, got {getattr(cfg, name)}")
    if cfg.layer < 0:
        raise ParamsError(f"params key '{key}.layer' must be a vision block index (0 or more), got {cfg.layer}")
    if cfg.beta < 0:
        raise ParamsError(f"params key '{key}.beta' must be zero or positive, got {cfg.beta}")
    for name in ("variance", "lr", "nsd_tolerance"):
        if not getattr(cfg, name) > 0:
            raise ParamsError(f"params key '{key}.{name}' must be a positive number, got {getattr(cfg, name)}")
    if not 0 <= cfg.threshold < 1:
        raise ParamsError(f"params key '{key}.threshold' must lie in [0, 1), got {cfg.threshold}")
    if cfg.sam is not None and not cfg.sam.strip():
        raise ParamsError(f"params key '{key}.sam' must name a SAM hub id or local folder, or be null")
    search, key = cfg.hyper_opt, f"{key}.hyper_opt"  # that its sets exist is checked where the sets are loaded
    if search is None:
        return
    if cfg.saliency != "m2ib":
        raise ParamsError(f"params key '{key}' searches M2IB's beta, variance and layer, but saliency is {cfg.saliency!r}")
    if not search.sets or not all(isinstance(v, str) and v for v in search.sets.values()):
        raise ParamsError(f"params key '{key}.sets' must map each searched set to a validation set's name, "
                          f"got {search.sets!r}")
    for name in ("beta", "variance", "layer"):
        if not getattr(search, name):
            raise ParamsError(f"params key '{key}.{name}' must list at least one value")
    if min(search.beta) < 0 or not min(search.variance) > 0 or min(search.layer) < 0:
        raise ParamsError(f"params key '{key}': betas must be zero or more, variances positive and layers 0 or more")
    if search.draws is not None and search.draws < 1:
        raise ParamsError(f"params key '{key}.draws' must be at least 1 or null, got {search.draws}")
    if not 0 <= search.threshold < 1:
        raise ParamsError(f"params key '{key}.threshold' must lie in [0, 1), got {search.threshold}")


def validate_models(params: Params) -> None:
    """The evaluated models are `baseline` (the model before transfer) and every recipe, so no recipe
    may be called `baseline`; `evaluate.use` names sets that exist."""
    if "baseline" in params.recipes:
        raise ParamsError("params key 'recipes.baseline': 'baseline' names the model before transfer; "
                          "call the recipe something else")
    if "families" in params.recipes:
        raise ParamsError("params key 'recipes.families': metrics/eval/families holds the model families' "
                          "evaluations; call the recipe something else")
    unknown = sorted(set(params.evaluate.use or ()) - set(params.evaluate.sets))
    if unknown:
        raise ParamsError(f"params key 'evaluate.use' names {unknown}, which are not in evaluate.sets "
                          f"{sorted(params.evaluate.sets)}")


def validate_sets(sets: dict[str, DatasetParams]) -> None:
    """Evaluation sets: known formats, names usable as metric keys, references that exist."""
    for name, spec in sets.items():
        key = f"evaluate.sets.{name}"
        if not name.replace("_", "").isalnum():
            raise ParamsError(f"params key '{key}': set names may hold letters, digits and '_' only")
        if spec.format not in DATASET_FORMATS:
            raise ParamsError(f"params key '{key}.format' must be one of {list(DATASET_FORMATS)}, got {spec.format!r}")
        if spec.format != "demo" and not spec.root:
            raise ParamsError(f"params key '{key}.root' must name the dataset folder for format {spec.format!r}")
        if spec.format == "demo" and spec.split not in ("val", "test"):
            raise ParamsError(f"params key '{key}.split' must be val or test, got {spec.split!r}")
        if spec.format == "karpathy" and spec.split not in ("train", "restval", "val", "test"):
            raise ParamsError(f"params key '{key}.split' must be train, restval, val or test, got {spec.split!r}")
        if spec.rerank is not None and spec.task != "retrieval":
            raise ParamsError(f"params key '{key}.rerank' applies to task 'retrieval' only, the set's task is {spec.task!r}")
        if spec.rerank is not None and spec.rerank.k < 1:
            raise ParamsError(f"params key '{key}.rerank.k' must be at least 1, got {spec.rerank.k}")
        if spec.subset is not None and spec.subset < 1:
            raise ParamsError(f"params key '{key}.subset' must be a positive integer or null")
        if spec.prompt is not None and not spec.prompt.strip():
            raise ParamsError(f"params key '{key}.prompt' is empty: give the segmentation prompt, or null to "
                              "prompt with the class name through the templates")
        if spec.spacing and (len(spec.spacing) > 2 or not all(v > 0 for v in spec.spacing)):
            raise ParamsError(f"params key '{key}.spacing' must be one or two positive numbers (rows, columns), "
                              f"got {list(spec.spacing)}")
        missing = sorted(set(spec.extra_classes) - set(sets))
        if missing:
            raise ParamsError(f"params key '{key}.extra_classes' names unknown set(s) {missing}; sets: {sorted(sets)}")


def read_yaml(path: str | Path) -> Any:
    """Read a YAML 1.2 file (ruamel's safe loader)."""
    path = Path(path)
    if not path.is_file():
        raise InputMissingError(f"params file not found: {path}")
    yaml = YAML(typ="safe", pure=True)
    try:
        with path.open() as fh:
            return yaml.load(fh)
    except Exception as err:  # ruamel raises many parser error types; report them uniformly
        raise ParamsError(f"cannot parse {path}: {err}") from err


def check_layout(raw: Any) -> None:
    """Name the move when a params file still lists its concepts at top level (before 'concepts'
    became the section that also says where their descriptions come from)."""
    if isinstance(raw, dict) and isinstance(raw.get("concepts"), list):
        raise ParamsError("params key 'concepts' is now a section: write the list as 'concepts: {names: [...]}', "
                          "next to the description files (file, generated) that the old 'captions' section held")


def load_params(path: str | Path = "params.yaml", family: str | None = None) -> Params:
    """Load and validate the whole params file; with `family`, that model family's params."""
    raw = read_yaml(path)
    check_layout(raw)
    params = validate(build_section(Params, raw))
    return params if family is None else params.family(family)
