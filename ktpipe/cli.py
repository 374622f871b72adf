"""`ktpipe` command line: the pipeline's steps without DVC, on the same library functions."""
from __future__ import annotations

import math
from pathlib import Path

import click

from ktpipe.errors import USER_ERRORS
from ktpipe.params import load_params as read_params

PARAMS_OPTION = click.option(
    "--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
    help="Params file (YAML 1.2); every section is type-checked.",
)


class UserError(click.ClickException):
    """An expected error (bad params, captions, data or model name): one line, exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"ktpipe: error: {self.message}", err=True)


def _run(fn, *args):
    """Run a library step, turning expected errors into a one-line message and exit status 2."""
    try:
        return fn(*args)
    except USER_ERRORS as err:
        raise UserError(str(err)) from err


def load_params(path: str):
    """Load params, reporting a malformed file as a user error."""
    return _run(read_params, path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ktpipe")
def main() -> None:
    """Knowledge Transfer: teach an image-text model new visual concepts from descriptions alone.

    Each command is one pipeline step; `dvc repro` chains them with caching.
    """


WORLD_OPTION = click.option(
    "--world", "world_path", default="data/world.json", show_default=True, type=click.Path(dir_okay=False),
    help="Demo world concepts, as `ktpipe captions` writes them (demo sets and pretraining only).")


@main.command()
@PARAMS_OPTION
@WORLD_OPTION
@click.argument("out_dir", type=click.Path(file_okay=False))
def data(params_path: str, world_path: str, out_dir: str) -> None:
    """Write one manifest per evaluation set (params `evaluate.sets`) into OUT_DIR."""
    from ktpipe.evalsets import run_data

    summary = _run(run_data, load_params(params_path), Path(out_dir), Path(world_path))
    for name, info in summary.items():
        click.echo(f"{name}: {info['n_images']} images of {len(info['classes'])} classes ({info['format']})")


@main.command("base_model")
@PARAMS_OPTION
@WORLD_OPTION
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--log", "log_path", default="metrics/base_model.json", show_default=True, help="Log (JSON).")
def base_model(params_path: str, world_path: str, out_dir: str, log_path: str) -> None:
    """Pretrain the demo model into OUT_DIR, or record the real model params name there."""
    from ktpipe.base_model import run_base_model

    summary = _run(run_base_model, load_params(params_path), Path(out_dir), Path(log_path), Path(world_path))
    click.echo(f"base model ready in {summary['seconds']} s -> {out_dir}")


@main.command()
@PARAMS_OPTION
@click.option("--generated", "generated_file", default=None, type=click.Path(dir_okay=False),
              help="Generated descriptions file (default: params `captions.generated`, relative to the params file).")
@click.option("--world", "world_path", default="data/world.json", show_default=True,
              type=click.Path(dir_okay=False), help="Where to write the demo world's concepts.")
@click.argument("captions_file", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
def captions(params_path: str, generated_file: str | None, world_path: str, captions_file: str, out_dir: str) -> None:
    """Describe every params concept from CAPTIONS_FILE; write one JSON per concept into OUT_DIR.

    Concepts CAPTIONS_FILE leaves undescribed take their entry in the generated file, or a new
    one that the LLM of params `captions.generator` writes there. A text longer than the text
    tower's context is an error unless params `captions.truncate` is true.
    """
    from ktpipe.captions import run_captions
    from ktpipe.models import load_base_text_budget

    params = load_params(params_path)
    generated = Path(generated_file) if generated_file else Path(params_path).parent / params.captions.generated
    budget = _run(load_base_text_budget, params.model)
    concepts = _run(run_captions, Path(captions_file), generated, params.concepts, Path(out_dir),
                    params.captions.generator, budget, params.captions.truncate, Path(world_path))
    click.echo(f"wrote {len(concepts)} concept files to {out_dir}")


@main.command()
@PARAMS_OPTION
@click.argument("concept_file", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--timing", "timing_path", default=None, type=click.Path(dir_okay=False),
              help="Write the wall time to this JSON file (kept out of OUT_DIR so it stays cacheable).")
def invert(params_path: str, concept_file: str, out_dir: str, timing_path: str | None) -> None:
    """Synthesize images of one concept (CONCEPT_FILE from `captions`) into OUT_DIR.

    Writes images.safetensors, grid.png and summary.json (final similarities and settings).
    """
    from ktpipe.invert import run_invert

    timing = Path(timing_path) if timing_path else None
    meta = _run(run_invert, load_params(params_path), Path(concept_file), Path(out_dir), timing)
    click.echo(f"inverted {meta['concept']!r} in {meta['seconds']} s -> {out_dir}")


@main.command()
@PARAMS_OPTION
@click.option("--recipe", required=True, help="A key of params `recipes` (e.g. paper, full).")
@click.option("--lr", type=float, default=None, help="Override params `lr` (fine-tuning learning rate).")
@click.argument("captions_dir", type=click.Path(file_okay=False))
@click.argument("inverted_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--log", "log_path", default=None, help="Training log JSON (default: OUT_DIR.json).")
def finetune(params_path: str, recipe: str, lr: float | None, captions_dir: str, inverted_dir: str,
             out_dir: str, log_path: str | None) -> None:
    """Fine-tune on the inverted images in INVERTED_DIR; save an open_clip checkpoint folder."""
    import dataclasses

    from ktpipe.finetune import run_finetune

    params = load_params(params_path)
    if lr is not None:
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"--lr must be a finite positive number, got {lr}")
        params = dataclasses.replace(params, lr=lr)
    log = Path(log_path) if log_path else Path(f"{out_dir.rstrip('/')}.json")
    summary = _run(run_finetune, params, recipe, Path(captions_dir), Path(inverted_dir), Path(out_dir), log)
    click.echo(f"fine-tuned on {summary['n_images']} images in {summary['seconds']} s -> {out_dir}")


@main.command()
@PARAMS_OPTION
@click.option("--checkpoint", type=click.Path(file_okay=False), default=None,
              help="Fine-tuned checkpoint folder; omit to evaluate the model before transfer.")
@click.option("--tag", default=None, help="Name recorded in the result (default: checkpoint folder name).")
@click.argument("eval_dir", type=click.Path(file_okay=False))
@click.argument("captions_dir", type=click.Path(file_okay=False))
@click.argument("out_path", type=click.Path(dir_okay=False))
def evaluate(params_path: str, checkpoint: str | None, tag: str | None, eval_dir: str, captions_dir: str,
             out_path: str) -> None:
    """Zero-shot classification on every evaluation set in EVAL_DIR (written by `ktpipe data`)."""
    from ktpipe.eval import run_evaluate

    folder = Path(checkpoint) if checkpoint else None
    tag = tag or (folder.name if folder else "baseline")
    metrics = _run(run_evaluate, load_params(params_path), tag, folder, Path(eval_dir), Path(captions_dir),
                   Path(out_path))
    for key, value in metrics.items():
        if key.endswith(("_name_target_acc", "_name_retention_acc", "_description_target_acc")):
            click.echo(f"{key}: {value:.3f}")


@main.command()
@PARAMS_OPTION
@click.argument("eval_dir", type=click.Path(file_okay=False))
@click.argument("captions_dir", type=click.Path(file_okay=False))
@click.argument("inverted_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
def report(params_path: str, eval_dir: str, captions_dir: str, inverted_dir: str, out_dir: str) -> None:
    """Write results.md, metrics.json, lr_curve.json and inverted.png into OUT_DIR."""
    from ktpipe.report import run_report

    _run(run_report, load_params(params_path), Path(eval_dir), Path(captions_dir), Path(inverted_dir), Path(out_dir))
    click.echo(f"wrote {out_dir}/results.md")


@main.command()
@click.option("--lr", type=float, required=True, help="Learning rate whose seeds are summarized.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the learning-rate table.")
@click.option("--out", "out_path", default="reports/experiments.md", show_default=True,
              help="Markdown file to write.")
def experiments(lr: float, seed: int, out_path: str) -> None:
    """Summarize finished DVC experiments: mean over seeds, and accuracy against lr."""
    from ktpipe.experiments import load_experiments, render
    from ktpipe.io import write_text

    text = _run(lambda: render(load_experiments("."), lr, seed))
    write_text(out_path, text)
    click.echo(text)


if __name__ == "__main__":
    main()
