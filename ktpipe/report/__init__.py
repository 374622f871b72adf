"""The experiment report: a figure of target against retention before and after transfer, per-concept
bars, Markdown tables per evaluation set, a headline table beside the paper's published numbers,
a figure of the inverted images, the metrics DVC lists per experiment, and the learning-rate plot
data (one file per recipe, so `dvc plots` draws any recipe names)."""
from __future__ import annotations

import json
import math
import re
import shutil
from importlib import resources
from pathlib import Path

import pandas as pd

from ktpipe.concepts import ConceptText, read_concepts
from ktpipe.errors import InputMissingError, warn
from ktpipe.eval import BASELINE, TASKS, outputs_dir
from ktpipe.eval.base import ReportsItems, pct
from ktpipe.io import write_json, write_text
from ktpipe.params import Params, ParamsError
from ktpipe.report.figures import TransferPoint, save_concept_figure, save_inversion_figure, save_transfer_figure
from ktpipe.report.tradeoff import (TradeoffPoint, pareto_front, save_tradeoff_figure, tradeoff_table,
                                    write_tradeoff_csv)

GROUPS = ("target", "retention")
FIGURES_DIR = "figures"  # in the report folder: figures the tasks draw (ktpipe.eval.segmentation)
TRANSFER_FIGURE = "figures/target_retention.png"  # in the report folder
CONCEPTS_FIGURE = "figures/concepts.png"
LR_CURVE_DIR = "lr_curve"  # in the report folder: <recipe>.json, one point per experiment
CLASS_KEY = re.compile(r"^name_class_(.+)_acc$")  # a classification's per-class accuracy
TRADEOFF_FIGURE = "figures/tradeoff.png"
TRADEOFF_CSV = "tradeoff.csv"  # in the report folder: the trade-off's points, for `dvc plots`


def load_results(params: Params, eval_dir: Path) -> dict[str, dict]:
    """model -> its evaluation JSON (ktpipe.eval.run_evaluate), from the evaluate stages, for every
    model of `params`. Each must have scored every set with the task params give it now: a set whose
    task changed after its evaluation ran (a stale result) is an error naming the file and both tasks."""
    out = {}
    for model in params.models():
        path = Path(eval_dir) / f"{model}.json"
        if not path.is_file():
            raise InputMissingError(f"evaluation result missing: {path}; run the evaluate stage for {model!r}")
        out[model] = json.loads(path.read_text())
        for set_name, spec in params.used_sets().items():
            scored = out[model].get("tasks", {}).get(set_name)
            if scored != spec.task:
                was = f"as {scored}" if scored else "not at all"
                raise InputMissingError(f"{path} scored set {set_name!r} {was}, but params "
                                        f"'evaluate.sets.{set_name}.task' is {spec.task}; rerun its evaluation (dvc repro)")
    return out


def set_results(results: dict[str, dict], set_name: str, task: str) -> dict[str, dict[str, float]]:
    """model -> one set's flat metrics of one task."""
    return {model: r["metrics"].get(set_name, {}).get(task, {}) for model, r in results.items()}


def load_paper_results(experiment: str) -> pd.DataFrame:
    """The paper's published numbers for one experiment (ktpipe/data/paper_results.csv)."""
    with resources.as_file(resources.files("ktpipe") / "data" / "paper_results.csv") as path:
        table = pd.read_csv(path, dtype={"lr": str})
    rows = table[table["experiment"] == experiment]
    if rows.empty:
        raise ParamsError(f"params key 'report.paper': no published results for {experiment!r}; "
                         f"known: {sorted(table['experiment'].unique())}")
    return rows


def mean_of(summary: dict[str, float], names: list[str] | None, key: str) -> float | None:
    """A summary's pooled `key` (names None), or the mean over the named concepts' own values."""
    if names is None:
        return summary.get(key)
    values = [summary[n] for n in names if n in summary]
    return sum(values) / len(values) if values else None


def headline(params: Params, results: dict) -> dict[str, dict]:
    """recipe -> target and retention before and after transfer, from the summaries of the
    report's target and retention sets."""
    sets = list(params.used_sets())
    target_set = params.report.target_set or sets[0]
    retention_set = params.report.retention_set or sets[-1]

    def summary(model: str, set_name: str) -> dict[str, float]:
        task = results[model]["tasks"][set_name]
        return results[model]["summary"][set_name][task]

    for group, set_name in (("target", target_set), ("retention", retention_set)):
        if params.recipes and group not in summary(BASELINE, set_name):
            task = results[BASELINE]["tasks"][set_name]
            warn(f"the headline's {group} is blank: set {set_name!r} ({task}) has no {group} group; "
                 f"params 'report.{group}_set' names a classification (or captioning) set for one")
    out = {}
    for recipe in params.recipes:
        cfg = params.recipe(recipe)
        names = list(cfg.concepts) if cfg.concepts else None  # None: all novel concepts, pooled
        out[recipe] = {
            "lr": params.recipe_lr(recipe),
            "baseline_target": mean_of(summary(BASELINE, target_set), names, "target"),
            "target": mean_of(summary(recipe, target_set), names, "target"),
            "baseline_retention": summary(BASELINE, retention_set).get("retention"),
            "retention": summary(recipe, retention_set).get("retention"),
        }
    return out


def summary_metrics(params: Params, results: dict) -> dict:
    """Nested metrics for `dvc exp show`: `<set>.<task>.<model>.<metric>` from each task's summary,
    and the headline per recipe."""
    out: dict = {"lr": params.lr, "headline": headline(params, results)}
    for set_name in params.used_sets():
        task = results[BASELINE]["tasks"][set_name]
        out[set_name] = {task: {model: r["summary"][set_name][task] for model, r in results.items()}}
    return out


def lr_set(params: Params) -> str:
    """The set the learning-rate curve is drawn on: `val` when evaluated (lr is chosen on it), else
    the report's target set."""
    sets = list(params.used_sets())
    return "val" if "val" in sets else (params.report.target_set or sets[0])


def lr_points(summary: dict, params: Params) -> dict[str, list[dict]]:
    """recipe -> its point of this experiment for the DVC plot of target and retention against lr
    (`dvc plots diff` across experiments draws the curve): on `lr_set` where that set scores both
    groups, else the headline's (target and retention sets of params `report`)."""
    set_name = lr_set(params)
    out = {}
    for task, models in summary.get(set_name, {}).items():
        for recipe in params.recipes:
            found = models.get(recipe, {})
            if all(g in found for g in GROUPS):
                out[recipe] = [{"lr": params.recipe_lr(recipe), "set": set_name,
                                **{g: found[g] for g in GROUPS}}]
    for recipe, head in summary.get("headline", {}).items():
        if recipe not in out and all(isinstance(head.get(g), (int, float)) for g in GROUPS):
            out[recipe] = [{"lr": head["lr"], "set": "headline", **{g: head[g] for g in GROUPS}}]
    return out


def chance_level(results: dict, set_name: str) -> float | None:
    """1 / the number of classes a classification set scores (None: not a classification set)."""
    metrics = results[BASELINE]["metrics"].get(set_name, {}).get("classification", {})
    classes = [key for key in metrics if CLASS_KEY.match(key)]
    return 1 / len(classes) if classes else None


def target_set(params: Params) -> str:
    return params.report.target_set or list(params.used_sets())[0]


def transfer_points(params: Params, results: dict, heads: dict,
                    families: dict[str, tuple[Params, dict, dict]]) -> list[TransferPoint]:
    """One point per recipe of the file's model and of each family, where both numbers are known."""
    points = []
    for name, (family, family_results, head) in {"model": (params, results, heads), **families}.items():
        chance = chance_level(family_results, target_set(family))
        for recipe, h in head.items():
            values = [h["baseline_target"], h["target"], h["baseline_retention"], h["retention"]]
            if all(v is not None for v in values):
                points.append(TransferPoint(f"{name}/{recipe}", *values, chance))
    return points


def tradeoff_points(params: Params, results: dict, heads: dict) -> list[TradeoffPoint]:
    """Each recipe after transfer and, with `evaluate.wise_alphas`, each of its WiSE-FT models (the
    alpha as its setting): target and retention on the report's sets, as the headline takes them."""
    sets = list(params.used_sets())
    target_name, retention_name = params.report.target_set or sets[0], params.report.retention_set or sets[-1]
    points = []
    for recipe, head in heads.items():
        if head["target"] is not None and head["retention"] is not None:
            points.append(TradeoffPoint(recipe, recipe, head["target"], head["retention"], 1.0 if
                                        results[recipe].get("wise") else None))
        cfg = params.recipe(recipe)
        for alpha, found in results[recipe].get("wise", {}).items():
            target_task, retention_task = (results[recipe]["tasks"][n] for n in (target_name, retention_name))
            target = mean_of(found["summary"][target_name][target_task], list(cfg.concepts) if cfg.concepts else None,
                             "target")
            retention = found["summary"][retention_name][retention_task].get("retention")
            if target is not None and retention is not None:
                points.append(TradeoffPoint(f"{recipe} alpha={alpha}", recipe, target, retention, float(alpha)))
    return points


def tradeoff_section(params: Params, results: dict, heads: dict, out_dir: Path) -> list[str]:
    """With WiSE-FT results: the trade-off figure (every recipe and alpha, the Pareto front, the model
    before transfer) and the best target kept at 95% and 99% of the base model's retention. The
    points always go to tradeoff.csv (a DVC plot across experiments)."""
    points = tradeoff_points(params, results, heads)
    write_tradeoff_csv(points, out_dir / TRADEOFF_CSV)
    if not any(p.setting is not None for p in points):
        return []
    first = next(iter(heads.values()))
    known = first["baseline_retention"] is not None and first["baseline_target"] is not None
    base = (first["baseline_retention"], first["baseline_target"]) if known else None
    save_tradeoff_figure(points, out_dir / TRADEOFF_FIGURE, base=base,
                         chance=chance_level(results, target_set(params)))
    front = ", ".join(f"`{p.label}`" for p in pareto_front(points))
    return [f"![Target against retention, every recipe and WiSE-FT alpha]({TRADEOFF_FIGURE})", "",
            "The forgetting trade-off: each recipe after transfer and its WiSE-FT models (weights moved back toward "
            f"the base model's by alpha, `evaluate.wise_alphas`; alpha 1 is the recipe). Pareto front: {front}.", "",
            *(tradeoff_table(points, base[0]) if base else []), ""]


def concept_bars(params: Params, results: dict, concepts: list[ConceptText],
                 families: dict[str, tuple[Params, dict, dict]]) -> dict:
    """Novel concept -> series -> accuracy on the target set: the model before transfer with name
    prompts and with description prompts, then every recipe (a family's as `<family>/<recipe>`)."""
    novel = [c.name for c in concepts if c.role == "novel" and c.name in params.inverted_names()]
    bars: dict[str, dict[str, float]] = {name: {} for name in novel}
    for family_name, (family, family_results) in {"model": (params, results),
                                                  **{n: (f, r) for n, (f, r, _) in families.items()}}.items():
        metrics = {model: r["metrics"].get(target_set(family), {}).get("classification", {})
                   for model, r in family_results.items()}
        prefix = "" if family_name == "model" else f"{family_name}/"
        for concept in novel:
            if family_name == "model":
                for series, key in (("before (name prompt)", "name"), ("before (description prompt)", "description")):
                    value = metrics[BASELINE].get(f"{key}_class_{concept}_acc")
                    if value is not None:
                        bars[concept][series] = value
            for model in family.recipes:
                value = metrics.get(model, {}).get(f"name_class_{concept}_acc")
                if value is not None:
                    bars[concept][f"{prefix}{model}"] = value
    return {concept: series for concept, series in bars.items() if series}


def figures_section(params: Params, results: dict, concepts: list[ConceptText], heads: dict, families: dict,
                    out_dir: Path) -> list[str]:
    """Draw the trade-off figure (with WiSE-FT results), the transfer figure and the per-concept bars;
    the Markdown that shows them."""
    lines = tradeoff_section(params, results, heads, out_dir)
    points = transfer_points(params, results, heads, families)
    if points:
        save_transfer_figure(points, out_dir / TRANSFER_FIGURE)
        lines += [f"![Target against retention, before and after transfer]({TRANSFER_FIGURE})", "",
                  f"Each arrow is one recipe of one model family on `{target_set(params)}`: from the model before "
                  "transfer (hollow) to the fine-tuned one (filled). Up is the novel concepts learned, left is known "
                  "ones forgotten; dashed lines mark chance.", ""]
    bars = concept_bars(params, results, concepts, families)
    if bars:
        save_concept_figure(bars, out_dir / CONCEPTS_FIGURE, f"Novel concepts on `{target_set(params)}`")
        lines += [f"![Accuracy per novel concept]({CONCEPTS_FIGURE})", "",
                  "Per novel concept: the model before transfer prompted with the concept's name and with its "
                  "description, then each recipe after transfer (name prompts). "
                  "Across seeds and learning rates: [experiments.md](experiments.md).", ""]
    return lines


def recipe_line(params: Params, recipe: str) -> str:
    """A recipe's overrides and the objective it trained with."""
    cfg = params.recipe(recipe)
    temperature = "the model's own" if cfg.temperature is None else f"{cfg.temperature:.4g}"
    kd = f", distillation weight {cfg.kd_weight:g}" if cfg.kd_weight else ""
    return (f"- `{recipe}`: loss `{cfg.loss}`, temperature {temperature}{kd}; overrides "
            f"{json.dumps(params.recipes[recipe])}")


PAPER_METRICS = {"target": ("target", "top1"), "retention": ("retention",)}  # Table 3 reports top-1


def paper_value(paper: pd.DataFrame, recipe: str, metric: str, lr: float | None) -> float | None:
    """A published number: at `lr` (None: the baseline column), for a recipe or `all`; `metric`
    is a headline metric (PAPER_METRICS) or a task's metric key (as `t2i_r1`)."""
    names = PAPER_METRICS.get(metric, (metric,))
    rows = paper[(paper["recipe"].isin([recipe, "all"])) & (paper["metric"].isin(names))]
    if lr is None:
        rows = rows[rows["lr"] == BASELINE]
    else:
        rows = rows[rows["lr"].map(lambda v: v != BASELINE and math.isclose(float(v), lr, rel_tol=1e-6))]
    return float(rows["value"].iloc[0]) if len(rows) else None


def headline_table(params: Params, heads: dict[str, dict]) -> list[str]:
    """Baseline and transfer per recipe, with the paper's numbers beside ours when known."""
    paper = load_paper_results(params.report.paper) if params.report.paper else None
    lines = ["| Recipe | lr | Target before | Target after | Retention before | Retention after |",
             "|---|---|---|---|---|---|"]
    for recipe, h in heads.items():
        cells = [pct(h["baseline_target"]), pct(h["target"]), pct(h["baseline_retention"]), pct(h["retention"])]
        if paper is not None:
            published = [paper_value(paper, recipe, "target", None), paper_value(paper, recipe, "target", h["lr"]),
                         paper_value(paper, recipe, "retention", None),
                         paper_value(paper, recipe, "retention", h["lr"])]
            cells = [f"{ours} (paper {pct(p)})" for ours, p in zip(cells, published)]
        lines.append(f"| {recipe} | {h['lr']:g} | " + " | ".join(cells) + " |")
    return lines


def paper_metrics(paper: pd.DataFrame, set_name: str, ours: dict[str, float]) -> dict[str, str]:
    """Published metric -> our key, for the metrics of one set: a plain name (as `t2i_r1`), or
    `<set>.<metric>` where the paper gives one number per set (Tables 4 and 7: `udiat.dsc`)."""
    found = {}
    for metric in dict.fromkeys(paper["metric"]):
        key = metric.removeprefix(f"{set_name}.")
        if key in ours and (key == metric or "." not in key):
            found[metric] = key
    return found


def paper_beside(params: Params, ours: dict[str, dict[str, float]], set_name: str = "") -> list[str]:
    """Our metrics beside the paper's for every task metric of this set that `report.paper`
    publishes (as the recalls of Tables 5 and 8, or Table 4's per-set DSC): one row per model, at
    its lr; empty when none is published."""
    if not params.report.paper or BASELINE not in ours:
        return []
    paper = load_paper_results(params.report.paper)
    metrics = paper_metrics(paper, set_name, ours[BASELINE])
    if not metrics:
        return []
    lines = [f"Beside the paper (`{params.report.paper}`, at the same lr):", "",
             "| Model | lr | " + " | ".join(metrics.values()) + " |", "|---|---|" + "---|" * len(metrics)]
    for model, found in ours.items():
        lr = None if model == BASELINE else params.recipe_lr(model)
        cells = [f"{pct(found.get(key))} (paper {pct(paper_value(paper, model, metric, lr))})"
                 for metric, key in metrics.items()]
        lines.append(f"| {model} | {'-' if lr is None else f'{lr:g}'} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def set_notes(results: dict, set_name: str) -> list[str]:
    """The notes the evaluations left for a set (`notes.<set>`), each once, with the models it concerns."""
    models: dict[str, list[str]] = {}
    for model, result in results.items():
        for note in result.get("notes", {}).get(set_name, []):
            models.setdefault(note, []).append(model)
    return [f"**Note** ({', '.join(found)}): {note}" for note, found in models.items()]


def truncation_note(ours: dict[str, dict[str, float]]) -> list[str]:
    """A note line when a model cut evaluation texts to its text limit (`texts_truncated`)."""
    cut = {model: int(m["texts_truncated"]) for model, m in ours.items() if m.get("texts_truncated")}
    if not cut:
        return []
    counts = ", ".join(f"{model} {n}" for model, n in cut.items())
    return [f"**Note**: texts over the model's text limit, cut to it as the model's own library does: {counts}.", ""]


def set_section(params: Params, results: dict, concepts: list[ConceptText], set_name: str,
                eval_dir: Path | None = None, report_dir: Path = Path("reports")) -> list[str]:
    """A set's heading, its task's table (baseline first, then each recipe), the evaluations' notes,
    the items a task shows from its per-item files in `eval_dir` (ReportsItems), and the paper's
    numbers beside ours where published."""
    spec = params.used_sets()[set_name]
    task = TASKS[spec.task]
    ours = set_results(results, set_name, spec.task)
    lines = [f"## Set `{set_name}` ({spec.task}, {spec.format})", "", *task.report_table(ours, concepts), ""]
    lines += [line for note in set_notes(results, set_name) for line in (note, "")]
    lines += truncation_note(ours)
    if eval_dir is not None and isinstance(task, ReportsItems):
        folders = {model: outputs_dir(Path(eval_dir) / f"{model}.json") for model in results}
        lines += task.report_items(set_name, folders, concepts, report_dir)
    return [*lines, *paper_beside(params, ours, set_name)]


def family_heading(name: str, params: Params) -> str:
    """What a model family is: its name, backend, model and checkpoint."""
    return f"`{name}` ({params.model.backend}:{params.model.name}, {params.model.pretrained or 'random init'})"


def families_table(params: Params, heads: dict, families: dict[str, tuple[Params, dict, dict]]) -> list[str]:
    """Every family's headline in one table: the file's own model first, then each family."""
    lines = ["| Family | Recipe | lr | Target before | Target after | Retention before | Retention after |",
             "|---|---|---|---|---|---|---|"]
    for name, (family, head) in {"model": (params, heads), **{n: (f, h) for n, (f, _, h) in families.items()}}.items():
        for recipe, h in head.items():
            cells = [pct(h["baseline_target"]), pct(h["target"]), pct(h["baseline_retention"]), pct(h["retention"])]
            label = f"`{name}` ({family.model.backend})"
            lines.append(f"| {label} | {recipe} | {h['lr']:g} | " + " | ".join(cells) + " |")
    return lines


def family_section(name: str, params: Params, results: dict, concepts: list[ConceptText],
                   eval_dir: Path | None = None, report_dir: Path = Path("reports")) -> list[str]:
    """A model family's recipes and every set's table, as the file's own model has them."""
    parts = [f"## Family {family_heading(name, params)}", "",
             f"Fine-tuning lr {params.lr:g}; recipes:", *[recipe_line(params, r) for r in params.recipes], ""]
    for set_name in params.used_sets():
        section = set_section(params, results, concepts, set_name, eval_dir, report_dir)
        section[0] = section[0].replace("## Set", f"### `{name}`: set", 1)
        parts += section
    return parts


def render_markdown(params: Params, results: dict, concepts: list[ConceptText], heads: dict,
                    families: dict[str, tuple[Params, dict, dict]] | None = None,
                    eval_dirs: dict[str, Path] | None = None, report_dir: Path = Path("reports"),
                    figures: list[str] = ()) -> str:
    """The whole Markdown report; `eval_dirs` (family name, `model` for the file's own model ->
    its evaluate stages' folder) lets tasks show items from their per-item files, linked
    relative to `report_dir`."""
    eval_dirs = eval_dirs or {}
    recipes = list(params.recipes)
    sets = list(params.used_sets())
    parts = [
        "# Knowledge Transfer results",
        "",
        *figures,
        f"Model `{params.model.backend}:{params.model.name}` ({params.model.pretrained or 'random init'}), "
        f"fine-tuning lr {params.lr:g}, seed {params.seed}, {params.finetune.epochs} epoch(s), "
        f"batch {params.finetune.batch_size}, towers `{params.finetune.towers}`.",
        "Accuracy is zero-shot top-1 with name prompts. *Baseline*: the model before transfer; "
        "*Description prompt*: the same model with each concept's description as its class prompt "
        "(only where every class is a described concept); *Transfer*: after fine-tuning on inverted images. "
        "*Target* pools the novel concepts' images, *retention* every other class.",
        "",
        "Recipes (the objective each trained with, and its overrides of the `finetune` section):",
        *[recipe_line(params, r) for r in recipes],
        "",
        f"## Headline (target on `{params.report.target_set or sets[0]}`, "
        f"retention on `{params.report.retention_set or sets[-1]}`)",
        "",
        *headline_table(params, heads),
        "",
    ]
    if params.report.paper:
        parts += [f"Paper numbers: `{params.report.paper}` in ktpipe/data/paper_results.csv, at the same lr.", ""]
    families = families or {}
    if families:
        parts += ["## Model families side by side (params `families`)", "",
                  "Families: " + "; ".join(family_heading(n, f) for n, f in
                                           [("model", params), *((n, f) for n, (f, _, _) in families.items())])
                  + ". Each family's sets and prompts are its own (its section below names them).", "",
                  *families_table(params, heads, families), ""]
    missing = results[BASELINE]["unevaluated"]
    if missing:
        parts += [f"**Not evaluated**: {', '.join(f'`{m}`' for m in missing)}: inverted and trained on, but no "
                  "evaluation set holds images of them (as a class or named in a caption), so they have no "
                  "score anywhere below.", ""]
    for set_name in sets:
        parts += set_section(params, results, concepts, set_name, eval_dirs.get("model"), report_dir)
    for name, (family, family_results, _) in families.items():
        parts += family_section(name, family, family_results, concepts, eval_dirs.get(name), report_dir)
    parts += ["![Inverted images](inverted.png)", ""]
    return "\n".join(parts)


def run_report(params: Params, eval_dir: Path, concepts_dir: Path, inverted_dir: Path, out_dir: Path,
               family_dirs: dict[str, Path] | None = None) -> dict:
    """Write results.md (opening with figures/tradeoff.png when there are WiSE-FT results, then
    figures/target_retention.png and figures/concepts.png), metrics.json, tradeoff.csv, lr_curve/<recipe>.json, inverted.png and the tasks' figures (figures/) into out_dir; `family_dirs`
    (family name -> its evaluate stages' folder) adds each model family of params `families`."""
    results = load_results(params, eval_dir)
    concepts = read_concepts(concepts_dir, params.concepts.names)
    summary = summary_metrics(params, results)
    families = {}
    for name, folder in (family_dirs or {}).items():
        family = params.family(name)
        family_results = load_results(family, folder)
        family_summary = summary_metrics(family, family_results)
        families[name] = (family, family_results, family_summary["headline"])
        summary.setdefault("families", {})[name] = family_summary
    out_dir = Path(out_dir)
    figures = out_dir / FIGURES_DIR  # the tasks write their figures here while the report renders: emptied first
    shutil.rmtree(figures, ignore_errors=True)
    figures.mkdir(parents=True)
    inverted = set(params.inverted_names())
    save_inversion_figure(inverted_dir, [c for c in concepts if c.name in inverted], out_dir / "inverted.png")
    shutil.rmtree(out_dir / LR_CURVE_DIR, ignore_errors=True)
    (out_dir / LR_CURVE_DIR).mkdir(parents=True)  # a DVC output even where no recipe has a point
    for recipe, points in lr_points(summary, params).items():
        write_json(out_dir / LR_CURVE_DIR / f"{recipe}.json", points)
    eval_dirs = {"model": Path(eval_dir), **{name: Path(folder) for name, folder in (family_dirs or {}).items()}}
    opening = figures_section(params, results, concepts, summary["headline"], families, out_dir)
    write_text(out_dir / "results.md", render_markdown(params, results, concepts, summary["headline"], families,
                                                       eval_dirs, out_dir, opening))
    write_json(out_dir / "metrics.json", summary)
    return summary
