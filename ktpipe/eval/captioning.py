"""Image captioning: one generated caption per image, scored against the image's reference
captions with pycocoevalcap (the COCO caption evaluation: PTB tokenizer, BLEU@1-4, METEOR,
ROUGE-L, CIDEr and SPICE), the protocol of the paper's Table 6.

Metrics are pooled over every image and per concept group: *target* pools the images whose
references name a novel concept, *retention* those naming only known ones, and each novel concept
gets its own scores. BLEU and METEOR are corpus statistics, recomputed on each group's images;
ROUGE-L, CIDEr and SPICE are means of per-image scores, so a group's value is the mean over its
images. CIDEr's document frequencies come from the whole set: computed within one concept's
images, the concept's name (in every reference) would weigh nothing.

pycocoevalcap runs Java: the tokenizer once per set (references and captions together), METEOR
as one process started before the captions are generated (it loads for seconds meanwhile) and
asked once per group, SPICE once per set. SPICE also needs Stanford CoreNLP jars that
pycocoevalcap downloads on first use; without them SPICE is left out with a note, never scored 0.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as corenlp
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from ktpipe import distributed
from ktpipe.concepts import ConceptText
from ktpipe.datasets import Manifest
from ktpipe.errors import InputMissingError, KtpipeError, warn
from ktpipe.eval.base import TaskInput, TaskResult
from ktpipe.eval.classification import image_batches, my_paths
from ktpipe.eval.retrieval import concept_pattern
from ktpipe.images import DatasetError
from ktpipe.io import write_text
from ktpipe.models.base import GeneratesCaptions, require

COLUMNS = {"bleu4": "BLEU@4", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr", "spice": "SPICE"}
CAPTIONS_FILE = "{}.captions.jsonl"  # per set, in TaskInput.outputs: one JSON line per image
EXAMPLES = 5  # images per recipe in the report's examples
SPICE_DOWNLOAD_TIMEOUT = 5.0  # seconds a CoreNLP download may stall before SPICE is given up
CORENLP_JARS = (f"{corenlp.JAR}.jar", f"{corenlp.JAR}-models.jar")  # what pycocoevalcap's SPICE loads
# SPICE's cache serializer reaches into java.base, which Java 16+ refuses without these (Java 8 ignores them)
SPICE_JAVA_OPTIONS = " ".join(f"--add-opens=java.base/{package}=ALL-UNNAMED" for package in
                              ("java.lang", "java.util", "java.math", "java.net", "java.text", "java.util.concurrent"))
SPICE_MISSING = ("SPICE not computed: the Stanford CoreNLP jars it needs ({}) are not in pycocoevalcap/spice/lib "
                 "and could not be downloaded; put them there (from stanford-corenlp-full-2015-12-09.zip) and rerun "
                 "the evaluation").format(", ".join(CORENLP_JARS))
SPICE_OFF = "SPICE not computed: params key 'evaluate.spice' is false"
SPICE_FAILED = "SPICE not computed: its Java scorer failed ({}); the evaluate stage's output shows its error"


# --- Java and SPICE's files -------------------------------------------------------------------


def require_java() -> None:
    """Stop with a clear error when no `java` is on PATH (pycocoevalcap's tokenizer and METEOR need it)."""
    if shutil.which("java") is None:
        raise KtpipeError("captioning scores captions with pycocoevalcap, whose PTB tokenizer, METEOR and SPICE "
                          "run Java, but no `java` is on PATH; install a Java runtime (Debian/Ubuntu: apt-get "
                          "install default-jre-headless) and rerun")


def missing_corenlp_jars() -> list[str]:
    """The CoreNLP jars SPICE needs that are not in pycocoevalcap/spice/lib."""
    lib = Path(corenlp.SPICEDIR) / corenlp.SPICELIB
    return [name for name in CORENLP_JARS if not (lib / name).is_file()]


def fetch_corenlp(timeout: float) -> None:
    """pycocoevalcap's own download of the CoreNLP jars, giving up when the network stalls `timeout` s."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        corenlp.get_stanford_models()
    finally:
        socket.setdefaulttimeout(previous)


def spice_missing_note() -> str | None:
    """None when SPICE can run (its jars are there, or were just fetched); else the note why not."""
    if not missing_corenlp_jars():
        return None
    try:
        fetch_corenlp(SPICE_DOWNLOAD_TIMEOUT)
    except (OSError, zipfile.BadZipFile, KeyError) as err:  # URLError and timeouts are OSErrors
        warn(f"SPICE left out: downloading Stanford CoreNLP for pycocoevalcap failed: {err}")
        return SPICE_MISSING
    return SPICE_MISSING if missing_corenlp_jars() else None


@contextmanager
def java_options(options: str) -> Iterator[None]:
    """Java launches in the block also read `options` (JDK_JAVA_OPTIONS, Java 9+)."""
    previous = os.environ.get("JDK_JAVA_OPTIONS")
    os.environ["JDK_JAVA_OPTIONS"] = f"{previous} {options}" if previous else options
    try:
        yield
    finally:
        if previous is None:
            del os.environ["JDK_JAVA_OPTIONS"]
        else:
            os.environ["JDK_JAVA_OPTIONS"] = previous


_METEOR: list[Meteor] = []  # this process's METEOR, once started


@contextmanager
def meteor_scorer() -> Iterator[Meteor]:
    """pycocoevalcap's METEOR process: started on first use (its Java loads paraphrase tables for
    7-13 s on 2 cores, in the background) and kept for every later evaluation of this process (a
    stage evaluates several models); stopped at exit, and replaced where it ended or an error
    left it mid-exchange."""
    if _METEOR and _METEOR[0].meteor_p.poll() is not None:
        stop_meteor(_METEOR.pop())
    if not _METEOR:
        _METEOR.append(Meteor())
        atexit.register(stop_meteor, _METEOR[0])
    try:
        yield _METEOR[0]
    except BaseException:
        stop_meteor(_METEOR.pop())
        raise


def stop_meteor(scorer: Meteor) -> None:
    if scorer.meteor_p.poll() is None:
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()


# --- scoring ----------------------------------------------------------------------------------


def one_line(text: str) -> str:
    """Text with every run of whitespace (line breaks included) as one space: the tokenizer reads lines."""
    return " ".join(text.split())


def tokenize(references: list[list[str]], captions: list[str]) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """PTB-tokenized, lower-cased references and captions per image index, in one Java run."""
    wanted = {("ref", i): refs for i, refs in enumerate(references)}
    wanted.update({("gen", i): [caption] for i, caption in enumerate(captions)})
    found = PTBTokenizer().tokenize({key: [{"caption": one_line(t)} for t in texts] for key, texts in wanted.items()})
    if any(len(found.get(key, ())) != len(texts) for key, texts in wanted.items()):
        raise KtpipeError(f"pycocoevalcap's PTB tokenizer (Java) returned {sum(map(len, found.values()))} of "
                          f"{sum(map(len, wanted.values()))} captions; its error is above")
    return ({i: found[("ref", i)] for i in range(len(references))},
            {i: found[("gen", i)] for i in range(len(captions))})


def mean(values: list[float]) -> float:
    """Mean of the values that are numbers (SPICE leaves NaN where a caption has no tuples); NaN if none."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def meteor_score(meteor: Meteor, gts: dict, res: dict) -> tuple[float, list[float]]:
    """METEOR of the captions (corpus and per image), with a clear error if its Java process stopped."""
    try:
        score, per_image = meteor.compute_score(gts, res)
    except (OSError, ValueError) as err:  # a broken pipe, or an empty line from a dead process
        raise KtpipeError(f"pycocoevalcap's METEOR (Java) stopped: {err}") from err
    return float(score), [float(s) for s in per_image]


def spice_scores(gts: dict, res: dict) -> tuple[list[float] | None, str | None]:
    """Per-image SPICE F-scores, or None and the note why SPICE could not run."""
    try:
        with java_options(SPICE_JAVA_OPTIONS):
            _, per_image = Spice().compute_score(gts, res)
    except subprocess.CalledProcessError as err:
        return None, SPICE_FAILED.format(f"exit status {err.returncode}")
    except OSError as err:  # its temporary and cache folders live in pycocoevalcap's folder
        warn(f"SPICE left out: {err}")
        return None, SPICE_FAILED.format(type(err).__name__)
    return [float(s["All"]["f"]) for s in per_image], None


def corpus_scores(gts: dict, res: dict, meteor: Meteor) -> tuple[dict[str, float], dict[str, list[float]]]:
    """BLEU@1-4, METEOR, ROUGE-L and CIDEr of tokenized captions: corpus values and per-image lists."""
    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    meteor_all, meteor_per = meteor_score(meteor, gts, res)
    rouge, rouge_per = Rouge().compute_score(gts, res)
    cider, cider_per = Cider().compute_score(gts, res)
    corpus = {**{f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}, "meteor": meteor_all,
              "rouge_l": float(rouge), "cider": float(cider)}
    per_image = {"bleu4": [float(b) for b in bleu_per[3]], "meteor": meteor_per,
                 "rouge_l": [float(r) for r in rouge_per], "cider": [float(c) for c in cider_per]}
    return corpus, per_image


def group_scores(ids: list[int], gts: dict, res: dict, per_image: dict[str, list[float]],
                 meteor: Meteor) -> dict[str, float]:
    """BLEU-4, METEOR, ROUGE-L, CIDEr and SPICE (when scored) over the images `ids`: BLEU-4 and
    METEOR recomputed on them, the rest the mean of their per-image scores."""
    sub_gts, sub_res = {i: gts[i] for i in ids}, {i: res[i] for i in ids}
    out = {"bleu4": float(Bleu(4).compute_score(sub_gts, sub_res, verbose=0)[0][3]),
           "meteor": meteor_score(meteor, sub_gts, sub_res)[0]}
    out.update({name: mean([per_image[name][i] for i in ids]) for name in ("rouge_l", "cider", "spice")
                if name in per_image})
    return out


def score_captions(references: list[list[str]], captions: list[str], groups: dict[str, list[int]],
                   spice: bool = True, meteor: Meteor | None = None
                   ) -> tuple[dict[str, float], dict[str, list[float]], str | None]:
    """Flat metrics (over all images: `n_images`, `bleu1`..`bleu4`, `meteor`, `rouge_l`, `cider`,
    `spice`; per group of image indices: `<group>_n_images` and `<group>_<metric>` of group_scores),
    per-image scores, and a note when SPICE was wanted but could not run. `meteor`: a running
    METEOR process (None: one is started)."""
    if meteor is None:
        with meteor_scorer() as own:
            return score_captions(references, captions, groups, spice, own)
    gts, res = tokenize(references, captions)
    metrics, per_image = corpus_scores(gts, res, meteor)
    note = None
    if spice:
        per_spice, note = spice_scores(gts, res)
        if per_spice is not None:
            per_image["spice"] = per_spice
            metrics["spice"] = mean(per_spice)
    out = {"n_images": float(len(captions)), **metrics}
    for prefix, ids in groups.items():
        out[f"{prefix}_n_images"] = float(len(ids))
        found = group_scores(ids, gts, res, per_image, meteor)
        out.update({f"{prefix}_{name}": value for name, value in found.items()})
    return out, per_image, note


# --- the set's images -------------------------------------------------------------------------


def check_references(manifest: Manifest) -> list[list[str]]:
    """Every image's non-empty references; an image without any is an error naming its file."""
    references = [[c for c in record.captions if c.strip()] for record in manifest.records]
    bare = [record.path for record, refs in zip(manifest.records, references) if not refs]
    if bare:
        raise DatasetError(f"evaluation set {manifest.name!r}: image {bare[0]} has no reference captions ("
                           f"{len(bare)} such image(s)); captioning scores each caption against its image's references")
    return references


def named_concepts(references: list[list[str]], concepts: list[ConceptText]) -> list[list[ConceptText]]:
    """Per image, the concepts its references name (as a whole word, by name or alias), novel ones first."""
    patterns = [(c, concept_pattern(c)) for c in sorted(concepts, key=lambda c: c.role != "novel")]
    return [[c for c, pattern in patterns if any(pattern.search(ref) for ref in refs)] for refs in references]


def image_groups(named: list[list[ConceptText]], concepts: list[ConceptText]) -> dict[str, list[int]]:
    """Metric prefix -> image indices: `target` (a novel concept named), `retention` (only known
    ones), `concept_<name>` per novel concept; groups without images are left out."""
    groups: dict[str, list[int]] = {"target": [], "retention": []}
    groups.update({f"concept_{c.name}": [] for c in concepts if c.role == "novel"})
    for i, found in enumerate(named):
        if found:
            groups[image_group(found)].append(i)
        for concept in found:
            if concept.role == "novel":
                groups[f"concept_{concept.name}"].append(i)
    return {prefix: ids for prefix, ids in groups.items() if ids}


def image_group(named: list[ConceptText]) -> str | None:
    """'target' when a novel concept is named, 'retention' when only known ones are, else None."""
    if not named:
        return None
    return "target" if any(c.role == "novel" for c in named) else "retention"


@torch.no_grad()
def generate(model: GeneratesCaptions, paths: tuple[str, ...], settings: dict, batch_size: int, workers: int = 0,
             progress: bool = True, pin_memory: bool = False) -> list[str]:
    """One caption per image, `batch_size` images per call (over several processes, each its share of
    the batches, gathered)."""
    batches: list[list[str]] = []
    for pixels in image_batches(model, my_paths(paths, batch_size), batch_size, workers, progress,
                                "generate captions", pin_memory):
        found = model.generate_captions(pixels, **settings)
        if len(found) != len(pixels):
            raise RuntimeError(f"{type(model).__name__}.generate_captions returned {len(found)} captions "
                               f"for {len(pixels)} images")
        batches.append(list(found))
    return [caption for batch in distributed.gather_chunks(batches) for caption in batch]


def caption_rows(manifest: Manifest, references: list[list[str]], captions: list[str],
                 named: list[list[ConceptText]], per_image: dict[str, list[float]]) -> list[dict]:
    """One JSON line per image: its path, references, generated caption, group, the concepts its
    references name, and its per-image scores."""
    rows = []
    for i, record in enumerate(manifest.records):
        scores = {name: (None if math.isnan(v[i]) else v[i]) for name, v in per_image.items()}
        rows.append({"path": record.path, "references": references[i], "caption": captions[i],
                     "group": image_group(named[i]), "concepts": [c.name for c in named[i]], **scores})
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    """JSON lines, written whole or not at all."""
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_rows(path: Path) -> list[dict]:
    """The rows `write_rows` wrote; a missing file names the evaluation that writes it."""
    if not path.is_file():
        raise InputMissingError(f"generated captions missing: {path}; rerun the evaluate stage that writes them")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- the report -------------------------------------------------------------------------------


REPORT_IMAGES = "figures/captioning"  # in the report folder: the images the examples show


def x100(value: float | None) -> str:
    """A score as the paper prints it (x100, one decimal); '-' when missing or NaN."""
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return one_line(text).replace("|", "\\|") or "(empty)"


def image_link(path: str, report_dir: Path) -> str:
    """A Markdown image of `path`, copied into the report's figures/ folder (the evaluation images
    under data/ are DVC outputs that git ignores, so a link there would break in a clone)."""
    source = Path(path)
    copy = Path(report_dir) / REPORT_IMAGES / f"{source.parent.name}_{source.name}"
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, copy)
    return f"![{source.stem}]({quote(copy.relative_to(report_dir).as_posix())})"


def improved_examples(before: list[dict], after: list[dict], k: int) -> list[tuple[dict, dict]]:
    """The `k` images whose METEOR rose most from `before` to `after` (rows of the same images), rises only."""
    if [r["path"] for r in before] != [r["path"] for r in after]:
        raise KtpipeError("generated-caption files list different images; rerun every evaluate stage")
    pairs = [(b, a) for b, a in zip(before, after) if a["meteor"] > b["meteor"]]
    return sorted(pairs, key=lambda pair: pair[1]["meteor"] - pair[0]["meteor"], reverse=True)[:k]


def examples_table(pairs: list[tuple[dict, dict]], baseline: str, recipe: str, report_dir: Path) -> list[str]:
    """Table 10's shape: image, a reference, the caption before and after, per-image METEOR."""
    lines = [f"| Image | Concept | Reference | {baseline} | {recipe} | METEOR |", "|---|---|---|---|---|---|"]
    for b, a in pairs:
        concept = ", ".join(a["concepts"]) or "-"
        lines.append(f"| {image_link(a['path'], report_dir)} | {concept} | {cell(a['references'][0])} | "
                     f"{cell(b['caption'])} | {cell(a['caption'])} | {x100(b['meteor'])} -> {x100(a['meteor'])} |")
    return lines


class Captioning:
    """Image captioning (the `captioning` task): BLEU@1-4, METEOR, ROUGE-L, CIDEr and SPICE of one
    generated caption per image against its references."""

    name = "captioning"
    record_kind = "captioned"

    def evaluate(self, model, data: TaskInput, progress: bool = True) -> TaskResult:
        """Caption every image, score overall, per group and per novel concept, and write the
        captions with their per-image scores to `<outputs>/<set>.captions.jsonl`."""
        require(model, GeneratesCaptions, "captioning")
        references = check_references(data.manifest)
        require_java()
        spice_note = spice_missing_note() if data.params.spice else SPICE_OFF
        named = named_concepts(references, data.concepts)
        groups = image_groups(named, data.concepts)
        model.module.eval()
        settings = dataclasses.asdict(data.params.generation)
        with meteor_scorer() as meteor:  # METEOR loads while the captions are generated
            captions = generate(model, data.manifest.paths, settings, data.params.batch_size, data.params.workers,
                                progress, data.params.pin_memory)
            metrics, per_image, run_note = score_captions(references, captions, groups, spice_note is None, meteor)
        if data.outputs is not None:
            rows = caption_rows(data.manifest, references, captions, named, per_image)
            write_rows(Path(data.outputs) / CAPTIONS_FILE.format(data.set_name), rows)
        notes = tuple(n for n in (spice_note, run_note) if n)
        return TaskResult(metrics, notes)

    def summary(self, metrics: dict[str, float], concepts: list[ConceptText]) -> dict[str, float]:
        """BLEU-4, METEOR, CIDEr and SPICE (when computed) over all images; METEOR and CIDEr on
        the target and retention images."""
        keys = ["bleu4", "meteor", "cider", "spice", *(f"{group}_{name}" for group in ("target", "retention")
                                                     for name in ("meteor", "cider"))]
        return {key: metrics[key] for key in keys if key in metrics}

    def report_table(self, results: dict[str, dict[str, float]], concepts: list[ConceptText]) -> list[str]:
        """Table 6's shape: BLEU@4, METEOR, ROUGE-L, CIDEr and SPICE (x100) per model, over all
        images, the target images, each novel concept's and the retention images."""
        rows = [("all", ""), ("target", "target_"),
                *((c.name, f"concept_{c.name}_") for c in concepts if c.role == "novel"), ("retention", "retention_")]
        lines = ["| Images | Model | " + " | ".join(COLUMNS.values()) + " |", "|---|---|" + "---|" * len(COLUMNS)]
        for label, prefix in rows:
            for model, metrics in results.items():
                if f"{prefix}n_images" in metrics:
                    cells = [x100(metrics.get(prefix + key)) if key != "spice" or f"{prefix}spice" in metrics
                             else "n/a" for key in COLUMNS]
                    n = int(metrics[f"{prefix}n_images"])
                    lines.append(f"| {label} ({n}) | {model} | " + " | ".join(cells) + " |")
        legend = ("Scores x100 (pycocoevalcap, PTB-tokenized). *Target*: images whose references name a novel "
                  "concept; *retention*: those naming only known ones. CIDEr's document frequencies come from the "
                  "whole set.")
        if any("spice" not in metrics for metrics in results.values()):
            legend += " SPICE n/a: not computed (see the note below)."
        return [*lines, "", legend]

    def report_items(self, set_name: str, folders: dict[str, Path], concepts: list[ConceptText],
                     report_dir: Path) -> list[str]:
        """For each recipe, the images whose METEOR rose most from the baseline's caption to the recipe's."""
        rows = {model: read_rows(Path(folder) / CAPTIONS_FILE.format(set_name)) for model, folder in folders.items()}
        baseline, *recipes = rows
        lines = []
        for recipe in recipes:
            pairs = improved_examples(rows[baseline], rows[recipe], EXAMPLES)
            lines += [f"Captions whose METEOR rose most from `{baseline}` to `{recipe}` (of {len(rows[recipe])} "
                      "images; METEOR x100):", ""]
            lines += [*examples_table(pairs, baseline, recipe, report_dir), ""] if pairs else [
                "No image's METEOR rose.", ""]
        return lines
