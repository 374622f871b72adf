"""Zero-shot segmentation as MedCLIP-SAMv2 does it (paper Sec. 4.4.1 and 8.6, Tables 4 and 7): a
saliency map of the vision tower for the set's prompt (M2IB, or the gradient baseline;
ktpipe.eval.saliency), post-processed to a coarse mask (threshold, Otsu or k-means, then the largest
connected components; ktpipe.eval.masks), optionally refined by SAM prompted with the components'
boxes (ktpipe.models.sam) and cut to as many components as the coarse mask has, scored against
the ground truth with MONAI's DSC, NSD and IoU. With `hyper_opt`, a set's M2IB beta, variance and
layer are first picked by MedCLIP-SAMv2's grid search on its validation set (`search_saliency`);
the metrics then hold the chosen setting (`hyper_opt_beta`, `_variance`, `_layer`, `_dsc`) and
every setting's validation DSC (`hyper_opt_dsc_beta<b>_variance<v>_layer<l>`, '.' written 'p').

Masks are scored at each image's own size and geometry: the saliency map covers the model's
center crop of the image and is zero outside it. An image's scores are MONAI's for that image;
a set's are their means over the images MONAI scores (`ktpipe.eval.masks.EMPTY_TRUTH` says which).
Metrics pool every image, the images of novel concepts (`target_*`), of known ones or other
classes (`retention_*`) and each novel concept's (`concept_<name>_*`). With SAM, the coarse
saliency mask is scored too (`saliency_dsc`, `target_saliency_dsc`, ...). Per image: `<outputs>/<set>.segmentation.parquet`
with the scores, and the saliency map and predicted mask of each image as PNGs.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from ktpipe.concepts import ConceptText
from ktpipe.datasets import Manifest, normalize_class
from ktpipe.errors import InputMissingError, KtpipeError
from ktpipe.eval.base import TaskInput, TaskResult, pct
from ktpipe.eval.classification import class_embeddings, name_prompts
from ktpipe.images import open_image
from ktpipe.models.base import EmbedsTexts, TakesImages, VisionFeatures, require
from ktpipe.params import DatasetParams, ParamsError, SegmentationParams

COLUMNS = {"dsc": "DSC", "nsd": "NSD", "iou": "IoU"}
SCORES_FILE = "{}.segmentation.parquet"  # per set, in TaskInput.outputs: one row per image
SALIENCY_FOLDER = "{}.saliency"  # per set: each image's saliency map, 8-bit grayscale PNG
MASKS_FOLDER = "{}.masks"  # per set: each image's predicted mask, 0 or 255
FIGURE_FILE = "figures/{}_{}_segmentation.png"  # in the report folder (its figures/ folder): set, recipe
EXAMPLES = 4  # images per recipe in the report's figure (the most improved)


def set_prompts(manifest: Manifest, spec: DatasetParams, concepts: list[ConceptText],
                templates: list[str]) -> list[list[str]]:
    """Per class of the set, the prompts whose mean embedding the saliency follows: the set's one
    `prompt` (the paper's P1-P4), else the templates over the class name (a concept's name,
    aliases or prompt override, as classification prompts it)."""
    if spec.prompt is not None:
        if not spec.prompt.strip():
            raise KtpipeError(f"params key 'evaluate.sets.{manifest.name}.prompt' is empty")
        return [[spec.prompt] for _ in manifest.classes]
    by_name = {normalize_class(n): c for c in concepts for n in (c.name, c.text_name)}
    prompts = []
    for name in manifest.classes:
        concept = by_name.get(normalize_class(name))
        prompts.append(name_prompts(concept, templates) if concept else [t.format(name) for t in templates])
    return prompts


def record_groups(manifest: Manifest, concepts: list[ConceptText]) -> tuple[list[str], dict[str, list[int]]]:
    """Per image its group (`target`: a novel concept's, else `retention`), and metric prefix ->
    image indices: target, retention and `concept_<name>` per novel concept (empty groups left out)."""
    novel = {normalize_class(n): c for c in concepts if c.role == "novel" for n in (c.name, c.text_name)}
    groups: dict[str, list[int]] = {"target": [], "retention": []}
    labels = []
    for i, record in enumerate(manifest.records):
        concept = novel.get(normalize_class(manifest.classes[record.label]))
        group = "target" if concept else "retention"
        labels.append(group)
        groups[group].append(i)
        if concept:
            groups.setdefault(f"concept_{concept.name}", []).append(i)
    return labels, {prefix: ids for prefix, ids in groups.items() if ids}


def load_sam(cfg: SegmentationParams, device: str):
    """SAM when the params name one (a missing checkpoint is an error naming it), else None."""
    if cfg.sam is None:
        return None
    from ktpipe.models.sam import SamSegmenter  # transformers' SAM loads only when used

    return SamSegmenter.load(cfg.sam, device)


def segment_images(model, images: list[Image.Image], targets: torch.Tensor, cfg: SegmentationParams,
                   sam) -> list[dict[str, np.ndarray]]:
    """Per image: its saliency map, coarse mask and predicted mask (SAM's cut to as many components
    as the coarse mask has, or the coarse one), at the image's size."""
    from ktpipe.eval.masks import keep_sam_components, mask_boxes, resize_saliency_to_image, saliency_to_mask
    from ktpipe.eval.saliency import compute_saliency  # the saliency and mask code (MONAI, scipy, scikit-image: about
    # 2.5 s of imports) load only where a set segments

    pixels = torch.stack([model.preprocess(image) for image in images]).to(targets.device)
    maps = compute_saliency(model, pixels, targets, cfg, seed=cfg.seed).cpu()  # (B, S, S) in [0, 1]
    out = []
    for image, saliency in zip(images, maps):
        full = resize_saliency_to_image(saliency, *image.size)  # (H, W)
        coarse = saliency_to_mask(full, cfg.postprocess, cfg.threshold, cfg.components)
        out.append({"saliency": full, "coarse": coarse, "mask": coarse})
    if sam is not None:
        refined = sam.segment(images, [mask_boxes(found["coarse"]) for found in out])
        for found, mask in zip(out, refined):
            found["mask"] = keep_sam_components(mask, found["coarse"])
    return out


def save_png(array: np.ndarray, path: Path) -> None:
    """A mask (bool) as 0/255, or a saliency map in [0, 1] as 8-bit grayscale."""
    values = array.astype(np.uint8) * 255 if array.dtype == bool else np.clip(np.rint(array * 255), 0, 255)
    Image.fromarray(values.astype(np.uint8)).save(path)


def score_set(model, data: TaskInput, sam, groups: list[str], progress: bool = True) -> pd.DataFrame:
    """One row per image: path, mask, class, group (`groups`, one per record), its scores, and where
    its saliency map and predicted mask were written (in `data.outputs`, when given)."""
    from ktpipe.datasets.masks import read_mask
    from ktpipe.eval.masks import image_scores

    cfg, manifest = data.params.segmentation, data.manifest
    targets = class_embeddings(model, set_prompts(manifest, data.spec, data.concepts, data.templates), data.cache)
    spacing = data.spec.spacing  # (rows, columns), one value for both, or empty: pixels (ktpipe.eval.masks.pixel_spacing)
    folders = None
    if data.outputs is not None:
        folders = {kind: Path(data.outputs) / name.format(data.set_name) for kind, name in
                   (("saliency", SALIENCY_FOLDER), ("mask", MASKS_FOLDER))}
        for folder in folders.values():
            folder.mkdir(parents=True)
    rows = []
    starts = range(0, len(manifest), cfg.batch_size)
    for start in tqdm(starts, desc=f"segment {data.set_name}", disable=not progress, leave=False):
        records = manifest.records[start:start + cfg.batch_size]
        images = [open_image(Path(r.path)) for r in records]
        labels = torch.tensor([r.label for r in records], device=targets.device)
        found = segment_images(model, images, targets[labels], cfg, sam)
        for i, (record, image, masks) in enumerate(zip(records, images, found), start):
            truth = read_mask(Path(record.mask), image.size)
            row = {"path": record.path, "mask": record.mask, "class": manifest.classes[record.label],
                   "group": groups[i], **image_scores(masks["mask"], truth, spacing, cfg.nsd_tolerance)}
            if sam is not None:
                coarse = image_scores(masks["coarse"], truth, spacing, cfg.nsd_tolerance)
                row.update({f"saliency_{key}": value for key, value in coarse.items()})
            if folders is not None:
                name = f"{i:05d}.png"
                save_png(masks["saliency"], folders["saliency"] / name)
                save_png(masks["mask"], folders["mask"] / name)
                row["predicted"] = f"{MASKS_FOLDER.format(data.set_name)}/{name}"
            rows.append(row)
    return pd.DataFrame(rows)


def set_metrics(rows: pd.DataFrame, groups: dict[str, list[int]]) -> dict[str, float]:
    """Means over all images and per group (`<prefix>_dsc`, ...), with image counts."""
    from ktpipe.eval.masks import mean_scores

    keys = [c for c in rows.columns if c.removeprefix("saliency_") in COLUMNS]
    metrics = {**mean_scores({k: rows[k].to_numpy() for k in keys}), "n_images": float(len(rows))}
    for prefix, ids in groups.items():
        found = mean_scores({k: rows[k].to_numpy()[ids] for k in keys})
        metrics.update({f"{prefix}_{key}": value for key, value in found.items()})
        metrics[f"{prefix}_n_images"] = float(len(ids))
    return metrics


def empty_note(rows: pd.DataFrame) -> str | None:
    """A note when MONAI left images unscored (empty ground truth), else None."""
    from ktpipe.eval.masks import EMPTY_TRUTH

    unscored = int(rows["dsc"].isna().sum())
    if not unscored:
        return None
    return f"{unscored} of {len(rows)} images not scored: {EMPTY_TRUTH}"


# --- MedCLIP-SAMv2's hyper-parameter search (--hyper-opt) -------------------------------------

SEARCH_KEY = "evaluate.segmentation.hyper_opt"


def check_search_sets(data: TaskInput) -> None:
    """Every name in `hyper_opt.sets` is a loaded set, and no set is its own validation set."""
    search = data.params.segmentation.hyper_opt
    unknown = [name for pair in search.sets.items() for name in pair if name not in data.sets]
    if unknown:
        raise ParamsError(f"params key '{SEARCH_KEY}.sets' names {unknown}, which are not evaluated sets "
                          f"(loaded: {sorted(data.sets)})")
    own = [name for name, other in search.sets.items() if name == other]
    if own:
        raise ParamsError(f"params key '{SEARCH_KEY}.sets': {own} cannot be searched on their own images")


def search_images(manifest: Manifest, draws: int | None) -> list[int]:
    """Record indices the search scores: of the images whose mask is not empty (MedCLIP-SAMv2
    skips images without a mask), every one, or `draws` draws of one each, draw i by
    Python's random.Random(i) as MedCLIP-SAMv2's hyper_opt draws (repeats possible)."""
    from ktpipe.datasets.masks import read_mask

    pool = [i for i, record in enumerate(manifest.records) if read_mask(Path(record.mask)).any()]
    if not pool:
        raise KtpipeError(f"validation set {manifest.name!r} has no image with a non-empty mask to search on")
    return pool if draws is None else [random.Random(i).sample(pool, 1)[0] for i in range(draws)]


def grid_key(beta: float, variance: float, layer: int) -> str:
    """The metric name of one setting's validation DSC ('.' written 'p': DVC nests keys at dots)."""
    return f"hyper_opt_dsc_beta{beta:g}_variance{variance:g}_layer{layer}".replace(".", "p")


def search_saliency(model, data: TaskInput, progress: bool = True) -> tuple[SegmentationParams, dict[str, float]]:
    """MedCLIP-SAMv2's --hyper-opt: every (beta, variance, layer) of the grid, in its order, scored
    by the mean DSC of the saliency map above `threshold` (no component filter, no SAM) on the
    validation images, prompted as this set prompts. Returns the set's params with the best
    setting (the first on ties) and the metrics: the setting, its DSC, and each setting's DSC."""
    from ktpipe.datasets.masks import read_mask
    from ktpipe.eval.masks import image_scores, resize_saliency_to_image
    from ktpipe.eval.saliency import compute_saliency

    cfg = data.params.segmentation
    manifest = data.sets[cfg.hyper_opt.sets[data.set_name]]
    records = [manifest.records[i] for i in search_images(manifest, cfg.hyper_opt.draws)]
    images = [open_image(Path(r.path)) for r in records]
    truths = [read_mask(Path(r.mask), image.size) for r, image in zip(records, images)]
    targets = class_embeddings(model, set_prompts(manifest, data.spec, data.concepts, data.templates), data.cache)
    texts = targets[torch.tensor([r.label for r in records], device=targets.device)]  # (B, D)
    pixels = torch.stack([model.preprocess(image) for image in images]).to(targets.device)  # (B, 3, S, S)
    grid = list(itertools.product(cfg.hyper_opt.beta, cfg.hyper_opt.variance, cfg.hyper_opt.layer))
    scores = {}
    for beta, variance, layer in tqdm(grid, desc=f"hyper_opt {data.set_name}", disable=not progress, leave=False):
        setting = dataclasses.replace(cfg, beta=beta, variance=variance, layer=layer)
        maps = compute_saliency(model, pixels, texts, setting, seed=cfg.seed).cpu()  # (B, S, S)
        dsc = [image_scores(resize_saliency_to_image(m, *image.size) > cfg.hyper_opt.threshold, truth)["dsc"]
               for m, image, truth in zip(maps, images, truths)]
        scores[beta, variance, layer] = float(np.mean(dsc))
    beta, variance, layer = max(scores, key=scores.get)  # the first of equal maxima, as pandas' idxmax
    metrics = {"hyper_opt_beta": beta, "hyper_opt_variance": variance, "hyper_opt_layer": float(layer),
               "hyper_opt_dsc": scores[beta, variance, layer], "hyper_opt_n_images": float(len(records)),
               **{grid_key(*setting): score for setting, score in scores.items()}}
    return dataclasses.replace(cfg, beta=beta, variance=variance, layer=layer), metrics


# --- the report -------------------------------------------------------------------------------


def read_scores(folder: Path, set_name: str) -> pd.DataFrame:
    """The per-image scores an evaluation wrote; a missing file names the evaluation that writes it."""
    path = Path(folder) / SCORES_FILE.format(set_name)
    if not path.is_file():
        raise InputMissingError(f"per-image segmentation scores missing: {path}; rerun the evaluate stage that writes them")
    return pd.read_parquet(path)


def improved_images(before: pd.DataFrame, after: pd.DataFrame, k: int, first: frozenset[str] = frozenset()) -> list[int]:
    """Row indices of the `k` images whose DSC rose most from `before` to `after`, rises only; images
    of the classes in `first` (the novel concepts) come before every other."""
    if list(before["path"]) != list(after["path"]):
        raise KtpipeError("per-image segmentation files list different images; rerun every evaluate stage")
    gain = (after["dsc"] - before["dsc"]).to_numpy()
    order = [int(i) for i in np.argsort(-np.nan_to_num(gain, nan=-np.inf), kind="stable") if gain[i] > 0]
    classes = after["class"].map(normalize_class).to_numpy()
    novel = {normalize_class(name) for name in first}
    return sorted(order, key=lambda i: classes[i] not in novel)[:k]


def save_figure(rows: list[tuple[dict, dict]], folders: tuple[Path, Path], names: tuple[str, str], path: Path) -> None:
    """Figs. 6-7's shape: per image, the image, its ground truth, the mask before and after (with DSC)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ktpipe.datasets.masks import read_mask

    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2.1 * len(rows)), squeeze=False)
    for line, (before, after) in zip(axes, rows):
        image = open_image(Path(after["path"]))
        panels = [(np.asarray(image), f"{after['class']}: {Path(after['path']).name}"),
                  (read_mask(Path(after["mask"])), "ground truth"),
                  (np.asarray(Image.open(folders[0] / before["predicted"])), f"{names[0]}: DSC {pct(before['dsc'])}"),
                  (np.asarray(Image.open(folders[1] / after["predicted"])), f"{names[1]}: DSC {pct(after['dsc'])}")]
        for ax, (panel, title) in zip(line, panels):
            ax.imshow(panel, cmap=None if panel.ndim == 3 else "gray", interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


class Segmentation:
    """Zero-shot segmentation (the `segmentation` task): DSC, NSD and IoU of a prompted saliency
    map's mask (or SAM's, prompted with its boxes) against each image's ground-truth mask."""

    name = "segmentation"
    record_kind = "masked"

    def evaluate(self, model, data: TaskInput, progress: bool = True) -> TaskResult:
        """Segment every image (with M2IB's setting searched on the validation set first when
        `hyper_opt.sets` names this set), score overall, per group and per novel concept, and
        write the per-image scores, saliency maps and masks to `data.outputs`."""
        from ktpipe.eval.saliency import check_layer

        for capability in (TakesImages, VisionFeatures, EmbedsTexts):
            require(model, capability, "segmentation (saliency maps)")
        cfg = data.params.segmentation
        searched = cfg.hyper_opt is not None and data.set_name in cfg.hyper_opt.sets
        if cfg.hyper_opt is not None:
            check_search_sets(data)
        for layer in cfg.hyper_opt.layer if searched else (cfg.layer,):
            check_layer(model, layer)  # before SAM loads: a params error comes first
        sam = load_sam(cfg, getattr(model, "device", "cpu"))
        model.module.eval()
        search = {}
        if searched:
            chosen, search = search_saliency(model, data, progress)
            data = dataclasses.replace(data, params=dataclasses.replace(data.params, segmentation=chosen))
        labels, groups = record_groups(data.manifest, data.concepts)
        rows = score_set(model, data, sam, labels, progress)
        if data.outputs is not None:
            rows.to_parquet(Path(data.outputs) / SCORES_FILE.format(data.set_name), index=False)
        note = empty_note(rows)
        return TaskResult({**set_metrics(rows, groups), **search}, (note,) if note else ())

    def summary(self, metrics: dict[str, float], concepts: list[ConceptText]) -> dict[str, float]:
        """DSC, NSD and IoU over all images; `target` and `retention` are the groups' DSC, and
        each novel concept's DSC under its name (the report's headline reads those)."""
        out = {key: metrics[key] for key in COLUMNS if key in metrics}
        for group in ("target", "retention"):
            if f"{group}_dsc" in metrics:
                out[group] = metrics[f"{group}_dsc"]
        out.update({c.name: metrics[f"concept_{c.name}_dsc"] for c in concepts if f"concept_{c.name}_dsc" in metrics})
        return out

    def report_table(self, results: dict[str, dict[str, float]], concepts: list[ConceptText]) -> list[str]:
        """Tables 4 and 7's shape: DSC, NSD and IoU per model, over all images, the target images,
        each novel concept's and the retention images (with SAM, the saliency mask's DSC too)."""
        from ktpipe.eval.masks import EMPTY_TRUTH

        sam = any("saliency_dsc" in metrics for metrics in results.values())
        columns = [*COLUMNS.values(), *(["Saliency-mask DSC"] if sam else [])]
        rows = [("all", ""), ("target", "target_"),
                *((c.name, f"concept_{c.name}_") for c in concepts if c.role == "novel"), ("retention", "retention_")]
        lines = ["| Images | Model | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
        for label, prefix in rows:
            for model, metrics in results.items():
                if f"{prefix}n_images" in metrics:
                    keys = [*COLUMNS, *(["saliency_dsc"] if sam else [])]
                    cells = [pct(metrics.get(prefix + key)) for key in keys]
                    lines.append(f"| {label} ({int(metrics[f'{prefix}n_images'])}) | {model} | " + " | ".join(cells) + " |")
        legend = (f"MONAI's DiceMetric, SurfaceDiceMetric (NSD) and MeanIoU per image at the image's size, "
                  f"then the mean over images. {EMPTY_TRUTH} *Target*: images of novel concepts; *retention*: "
                  "the others.")
        return [*lines, "", legend]

    def report_items(self, set_name: str, folders: dict[str, Path], concepts: list[ConceptText],
                     report_dir: Path) -> list[str]:
        """For each recipe, a figure of the images whose DSC rose most from the baseline's mask to the recipe's."""
        scores = {model: read_scores(folder, set_name) for model, folder in folders.items()}
        baseline, *recipes = scores
        lines = []
        for recipe in recipes:
            novel = frozenset(c.name for c in concepts if c.role == "novel")
            ids = improved_images(scores[baseline], scores[recipe], EXAMPLES, novel)
            if not ids:
                lines += [f"No image's DSC rose from `{baseline}` to `{recipe}`.", ""]
                continue
            path = Path(report_dir) / FIGURE_FILE.format(set_name, recipe)
            pairs = [(scores[baseline].iloc[i].to_dict(), scores[recipe].iloc[i].to_dict()) for i in ids]
            save_figure(pairs, (Path(folders[baseline]), Path(folders[recipe])), (baseline, recipe), path)
            link = Path(os.path.relpath(path, report_dir)).as_posix()
            lines += [f"Masks whose DSC rose most from `{baseline}` to `{recipe}` (novel concepts first; image, "
                      f"ground truth, before, after; of {len(scores[recipe])} images):", "", f"![{set_name} {recipe}]({link})", ""]
        return lines
