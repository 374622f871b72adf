"""`ktpipe` command line: one click group whose commands are the pipeline's stages.

`dvc.yaml` runs each stage as `python -m ktpipe <stage> ...`; outside DVC the same commands run
one step by hand. Each command is the module `ktpipe/commands/<stage>.py` (its `command`), imported
only when it runs, so a stage pays only for its own imports and its DVC deps name only its own
code: a new stage is one new module, found by its file name.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

import click

from ktpipe import commands
from ktpipe.errors import KtpipeError

PARAMS_OPTION = click.option(
    "--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
    help="Params file (YAML 1.2); every section is type-checked.",
)


FAMILY_OPTION = click.option(
    "--family", default=None, metavar="NAME",
    help="Run for model family NAME: params with `families.NAME` applied (default: the file's own model).",
)


class UserError(click.ClickException):
    """An expected error (bad params, concepts, data or model name): one line, exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"ktpipe: error: {self.message}", err=True)


def run_step(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a library step, turning a `KtpipeError` into a one-line message and exit status 2
    (any other exception is a bug and keeps its traceback)."""
    try:
        return fn(*args, **kwargs)
    except KtpipeError as err:
        raise UserError(str(err)) from err


def load_params(path: str, family: str | None = None):
    """The params file (of one model family), type-checked; a malformed one is a user error."""
    from ktpipe.params import load_params as read_params

    return run_step(read_params, path, family)


class StageGroup(click.Group):
    """Commands are the modules of `ktpipe.commands`, imported when one runs (or help lists them)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(m.name for m in pkgutil.iter_modules(commands.__path__))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.list_commands(ctx):
            return None
        return importlib.import_module(f"{commands.__name__}.{name}").command


@click.group(cls=StageGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ktpipe")
def main() -> None:
    """Knowledge Transfer: teach an image-text model new visual concepts from descriptions alone.

    Each command is one pipeline stage; `dvc repro` chains them with caching.
    """
