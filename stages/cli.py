"""The `ktpipe` console script: every stage of this folder and the commands of `ktpipe.commands`.

A command's module is imported only when it runs (or help lists it), so a command pays only for its
own imports; a new stage is one new module here, found by its file name.
"""
from __future__ import annotations

import importlib
import pkgutil

import click

import stages
from ktpipe import commands
from ktpipe.cli import run_command

NOT_COMMANDS = {"cli"}  # modules of this folder that hold no command


def command_modules() -> dict[str, str]:
    """Command name -> module: the stages, then the other commands."""
    found = {m.name: f"{stages.__name__}.{m.name}" for m in pkgutil.iter_modules(stages.__path__)
             if not m.name.startswith("_") and m.name not in NOT_COMMANDS}
    found.update({m.name: f"{commands.__name__}.{m.name}" for m in pkgutil.iter_modules(commands.__path__)})
    return found


class CommandGroup(click.Group):
    """Commands are the modules of `stages` and `ktpipe.commands`, imported when one runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(command_modules())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = command_modules().get(name)
        return importlib.import_module(module).command if module else None


@click.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ktpipe")
def main() -> None:
    """Knowledge Transfer: teach an image-text model new visual concepts from descriptions alone.

    Each stage command is one step of the pipeline, which `dvc repro` chains with caching; run by
    hand, its paths default to those of dvc.yaml.
    """


if __name__ == "__main__":
    run_command(main)
