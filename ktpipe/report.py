"""The experiment report: Markdown tables per evaluation set, a headline table beside the
paper's published numbers, a figure of the inverted images, the metrics DVC lists per
experiment, and the learning-rate plot data."""
from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ktpipe.captions import ConceptText, read_concepts  # noqa: E402
from ktpipe.images import load_inversion, make_grid  # noqa: E402
from ktpipe.io import write_json, write_text  # noqa: E402
from ktpipe.errors import InputMissingError  # noqa: E402
from ktpipe.params import Params, ParamsError  # noqa: E402

BASELINE = "baseline"
GROUPS = ("target", "retention")
FIGURE_ROWS = 12  # concepts shown in inverted.png (the MSCOCO experiment has 80)


def load_results(eval_dir: Path, tags: list[str]) -> dict[str, dict[str, float]]:
    """tag -> flat metrics, from the evaluate stages' JSON files."""
    out = {}
    for tag in tags:
        path = Path(eval_dir) / f"{tag}.json"
        if not path.is_file():
            raise InputMissingError(f"evaluation result missing: {path}; run the evaluate stage for {tag!r}")
        out[tag] = json.loads(path.read_text())["metrics"]
    return out


def load_paper_results(experiment: str) -> pd.DataFrame:
    """The paper's published numbers for one experiment (ktpipe/data/paper_results.csv)."""
    with resources.as_file(resources.files("ktpipe") / "data" / "paper_results.csv") as path:
        table = pd.read_csv(path, dtype={"lr": str})
    rows = table[table["experiment"] == experiment]
    if rows.empty:
        raise ParamsError(f"params key 'report.paper': no published results for {experiment!r}; "
                         f"known: {sorted(table['experiment'].unique())}")
    return rows


def pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def target_of(metrics: dict[str, float], set_name: str, names: list[str] | None, prompt: str = "name") -> float | None:
    """Pooled target accuracy, or the mean class accuracy of the named concepts."""
    if names is None:
        return metrics.get(f"{set_name}_{prompt}_target_acc")
    values = [metrics.get(f"{set_name}_{prompt}_class_{n}_acc") for n in names]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def headline(params: Params, results: dict) -> dict[str, dict]:
    """recipe -> target and retention before and after transfer, on the report's sets."""
    sets = list(params.evaluate.sets)
    target_set = params.report.target_set or sets[0]
    retention_set = params.report.retention_set or sets[-1]
    out = {}
    for recipe in params.recipes:
        cfg = params.recipe(recipe)
        names = list(cfg.concepts) if cfg.concepts else None  # None: all novel concepts, pooled
        out[recipe] = {
            "lr": params.recipe_lr(recipe),
            "baseline_target": target_of(results[BASELINE], target_set, names),
            "target": target_of(results[recipe], target_set, names),
            "baseline_retention": results[BASELINE].get(f"{retention_set}_name_retention_acc"),
            "retention": results[recipe].get(f"{retention_set}_name_retention_acc"),
        }
    return out


def summary_metrics(params: Params, results: dict, concepts: list[ConceptText]) -> dict:
    """Nested metrics for `dvc exp show`: set -> model -> target, retention and each novel concept."""
    novel = [c.name for c in concepts if c.role == "novel"]
    columns = [("description_prompt", BASELINE, "description"), *((t, t, "name") for t in [BASELINE, *params.recipes])]
    out: dict = {"lr": params.lr, "headline": headline(params, results)}
    for set_name in params.evaluate.sets:
        out[set_name] = {
            label: {
                **{g: results[tag].get(f"{set_name}_{prompt}_{g}_acc") for g in GROUPS},
                **{c: results[tag].get(f"{set_name}_{prompt}_class_{c}_acc") for c in novel
                   if f"{set_name}_name_class_{c}_acc" in results[BASELINE]},
            }
            for label, tag, prompt in columns
        }
    return out


def lr_point(summary: dict, params: Params) -> list[dict]:
    """One row per experiment for the DVC plot of accuracy against learning rate."""
    row = {"lr": summary["lr"]}
    for recipe in params.recipes:
        for set_name in params.evaluate.sets:
            for group in GROUPS:
                row[f"{recipe}_{set_name}_{group}"] = summary[set_name][recipe][group]
    return [row]


def not_evaluated(results: dict, concepts: list[ConceptText]) -> list[str]:
    """Concepts with no accuracy in any set: no evaluation set holds images of them."""
    scored = {k.split("_class_", 1)[1].rsplit("_acc", 1)[0] for k in results[BASELINE] if "_name_class_" in k}
    return [c.name for c in concepts if c.name not in scored]


def recipe_line(params: Params, recipe: str) -> str:
    """A recipe's overrides and the objective it trained with."""
    cfg = params.recipe(recipe)
    temperature = "the model's own" if cfg.temperature is None else f"{cfg.temperature:.4g}"
    kd = f", distillation weight {cfg.kd_weight:g}" if cfg.kd_weight else ""
    return (f"- `{recipe}`: loss `{cfg.loss}`, temperature {temperature}{kd}; overrides "
            f"{json.dumps(params.recipes[recipe])}")


def set_table(results: dict, concepts: list[ConceptText], recipes: list[str], set_name: str) -> list[str]:
    """Per-concept accuracy, then pooled target, retention and overall, baseline vs transfer."""
    cols = ["Baseline", "Description prompt", *[f"Transfer ({r})" for r in recipes]]
    lines = ["| Class | Group | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]

    def row(label: str, group: str, key: str) -> str:
        values = [results[BASELINE].get(key.format("name")), results[BASELINE].get(key.format("description"))]
        values += [results[r].get(key.format("name")) for r in recipes]
        return f"| {label} | {group} | " + " | ".join(pct(v) for v in values) + " |"

    missing = set(not_evaluated(results, concepts))
    for role, group in (("novel", "target"), ("known", "retention")):
        present = [c for c in concepts if c.role == role and f"{set_name}_name_class_{c.name}_acc" in results[BASELINE]]
        lines += [row(c.name, group, f"{set_name}_{{}}_class_{c.name}_acc") for c in present]
        lines += [f"| {c.name} | {group} | " + " | ".join(["not evaluated"] * len(cols)) + " |"
                  for c in concepts if c.role == role and c.name in missing]
        if f"{set_name}_name_{group}_acc" in results[BASELINE]:
            lines.append(row(f"**{group} (pooled)**", group, f"{set_name}_{{}}_{group}_acc"))
    lines.append(row("**overall**", "all", f"{set_name}_{{}}_overall_acc"))
    return lines


PAPER_METRICS = {"target": ("target", "top1"), "retention": ("retention",)}  # Table 3 reports top-1


def paper_value(paper: pd.DataFrame, recipe: str, metric: str, lr: float | None) -> float | None:
    """A published number: at `lr` (None: the baseline column), for a recipe or `all`."""
    rows = paper[(paper["recipe"].isin([recipe, "all"])) & (paper["metric"].isin(PAPER_METRICS[metric]))]
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


def render_markdown(params: Params, results: dict, concepts: list[ConceptText], heads: dict) -> str:
    """The whole Markdown report."""
    recipes = list(params.recipes)
    sets = list(params.evaluate.sets)
    parts = [
        "# Knowledge Transfer results",
        "",
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
    missing = not_evaluated(results, concepts)
    if missing:
        parts += [f"**Not evaluated**: {', '.join(f'`{m}`' for m in missing)}: inverted and trained on, but no "
                  "evaluation set holds images of them, so they have no accuracy anywhere below.", ""]
    for set_name in sets:
        parts += [f"## Set `{set_name}` ({params.evaluate.sets[set_name].format})", "",
                  *set_table(results, concepts, recipes, set_name), ""]
    parts += ["![Inverted images](inverted.png)", ""]
    return "\n".join(parts)


def save_inversion_figure(inverted_dir: Path, concepts: list[ConceptText], path: Path) -> None:
    """One row of inverted images per concept (the first FIGURE_ROWS), labelled with its description."""
    shown = concepts[:FIGURE_ROWS]
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 1.1 * len(shown) + 0.4), squeeze=False)
    for ax, concept in zip(axes[:, 0], shown):
        grid = make_grid(load_inversion(Path(inverted_dir) / concept.name), columns=10)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{concept.name} ({concept.role}): {concept.description[:140]}", fontsize=8, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def run_report(params: Params, eval_dir: Path, captions_dir: Path, inverted_dir: Path, out_dir: Path) -> dict:
    """Write results.md, metrics.json, lr_curve.json and inverted.png into out_dir."""
    results = load_results(eval_dir, [BASELINE, *params.recipes])
    concepts = read_concepts(captions_dir, params.concepts)
    summary = summary_metrics(params, results, concepts)
    out_dir = Path(out_dir)
    save_inversion_figure(inverted_dir, concepts, out_dir / "inverted.png")
    write_json(out_dir / "lr_curve.json", lr_point(summary, params))
    write_text(out_dir / "results.md", render_markdown(params, results, concepts, summary["headline"]))
    write_json(out_dir / "metrics.json", summary)
    return summary
