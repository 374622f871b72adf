"""The experiment report: a Markdown table in the paper's Table 1 shape, a figure of the
inverted images, the metrics DVC lists per experiment, and the learning-rate plot data."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ktpipe.captions import ConceptText, read_concepts  # noqa: E402
from ktpipe.images import make_grid  # noqa: E402
from ktpipe.invert import load_inversion  # noqa: E402
from ktpipe.io import write_json, write_text  # noqa: E402
from ktpipe.params import Params  # noqa: E402

BASELINE = "baseline"
SPLITS = ("val", "test")


def load_results(eval_dir: Path, tags: list[str]) -> dict[str, dict[str, float]]:
    """tag -> flat metrics, from the evaluate stages' JSON files."""
    out = {}
    for tag in tags:
        path = Path(eval_dir) / f"{tag}.json"
        if not path.is_file():
            raise FileNotFoundError(f"evaluation result missing: {path}; run the evaluate stage for {tag!r}")
        out[tag] = json.loads(path.read_text())["metrics"]
    return out


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def summary_metrics(results: dict[str, dict[str, float]], recipes: list[str], lr: float,
                    novel: list[str]) -> dict:
    """Nested metrics for `dvc exp show`: split -> model -> target, retention and each novel concept."""
    out: dict = {"lr": lr}
    columns = [("description_prompt", BASELINE, "description"), *((t, t, "name") for t in [BASELINE, *recipes])]
    for split in SPLITS:
        out[split] = {
            label: {
                **{g: results[tag].get(f"{split}_{prompt}_{g}_acc") for g in ("target", "retention")},
                **{c: results[tag].get(f"{split}_{prompt}_class_{c}_acc") for c in novel},
            }
            for label, tag, prompt in columns
        }
    return out


def lr_point(summary: dict, recipes: list[str]) -> list[dict]:
    """One row per experiment for the DVC plot of accuracy against learning rate."""
    row = {"lr": summary["lr"]}
    for recipe in recipes:
        for split in SPLITS:
            for group in ("target", "retention"):
                row[f"{recipe}_{split}_{group}"] = summary[split][recipe][group]
    return [row]


def results_table(results: dict, concepts: list[ConceptText], recipes: list[str], split: str) -> list[str]:
    """Per-concept accuracy, then pooled target (novel) and retention (known), baseline vs transfer."""
    cols = ["Baseline", "Description prompt", *[f"Transfer ({r})" for r in recipes]]
    lines = ["| Concept | Role | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]

    def row(label: str, role: str, key: str) -> str:
        values = [results[BASELINE].get(key.format("name")), results[BASELINE].get(key.format("description"))]
        values += [results[r].get(key.format("name")) for r in recipes]
        return f"| {label} | {role} | " + " | ".join(pct(v) for v in values) + " |"

    for role, group in (("novel", "target"), ("known", "retention")):
        lines += [row(c.name, role, f"{split}_{{}}_class_{c.name}_acc") for c in concepts if c.role == role]
        lines.append(row(f"**{group} (all {role})**", role, f"{split}_{{}}_{group}_acc"))
    return lines


def render_markdown(params: Params, results: dict, concepts: list[ConceptText], recipes: list[str]) -> str:
    """The whole Markdown report."""
    recipe_lines = [f"- `{r}`: {json.dumps(params.recipes[r])}" for r in recipes]
    parts = [
        "# Knowledge Transfer results",
        "",
        f"Model `{params.model.backend}:{params.model.name}`, fine-tuning lr {params.lr:g}, seed {params.seed}, "
        f"{params.finetune.epochs} epoch(s), batch {params.finetune.batch_size}, towers `{params.finetune.towers}`.",
        "Accuracy is zero-shot top-1 among all "
        f"{len(concepts)} concepts. *Baseline*: the model before transfer with name prompts; "
        "*Description prompt*: the same model with each concept's description as its class prompt; "
        "*Transfer*: after fine-tuning on inverted images. Retention pools the known concepts.",
        "",
        "Recipes (overrides of the `finetune` section):",
        *recipe_lines,
        "",
        "## Test split (reported)",
        "",
        *results_table(results, concepts, recipes, "test"),
        "",
        "## Validation split (used to choose the learning rate)",
        "",
        *results_table(results, concepts, recipes, "val"),
        "",
        "![Inverted images](inverted.png)",
        "",
    ]
    return "\n".join(parts)


def save_inversion_figure(inverted_dir: Path, concepts: list[ConceptText], path: Path) -> None:
    """One row of inverted images per concept, labelled with its description."""
    fig, axes = plt.subplots(len(concepts), 1, figsize=(10, 1.1 * len(concepts)), squeeze=False)
    for ax, concept in zip(axes[:, 0], concepts):
        grid = make_grid(load_inversion(Path(inverted_dir) / concept.name), columns=10)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{concept.name} ({concept.role}): {concept.description}", fontsize=8, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def run_report(params: Params, eval_dir: Path, captions_dir: Path, inverted_dir: Path, out_dir: Path) -> dict:
    """Write results.md, metrics.json, lr_curve.json and inverted.png into out_dir."""
    recipes = list(params.recipes)
    results = load_results(eval_dir, [BASELINE, *recipes])
    concepts = read_concepts(captions_dir, params.concepts)
    summary = summary_metrics(results, recipes, params.lr, [c.name for c in concepts if c.role == "novel"])
    out_dir = Path(out_dir)
    save_inversion_figure(inverted_dir, concepts, out_dir / "inverted.png")
    write_json(out_dir / "lr_curve.json", lr_point(summary, recipes))
    write_text(out_dir / "results.md", render_markdown(params, results, concepts, recipes))
    write_json(out_dir / "metrics.json", summary)
    return summary
