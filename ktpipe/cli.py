"""What every command line of ktpipe shares: the params and family options, one-line user errors,
and a quick exit.

The commands themselves live in two places: one module per DVC stage in the top-level `stages/`
folder (the command `dvc.yaml` runs, `python -m stages.<stage> ...`) and the commands that are
not stages (experiments, preset, ship_base_models) in `ktpipe/commands/`. The `ktpipe` console
script (`stages/cli.py`) reaches both, so every command has one definition.
"""
from __future__ import annotations

import atexit
import errno
import os
import signal
import sys
from typing import Any, Callable

import click

from ktpipe.errors import KtpipeError

PARAMS_OPTION = click.option(
    "--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
    help="Params file (YAML 1.2); every section is type-checked.",
)


def family_option(required: bool = False) -> Callable:
    """`--family NAME`, the same everywhere: run with params `families.NAME` merged over the file."""
    default = "" if required else " (default: the file's own model)"
    return click.option("--family", default=None, required=required, metavar="NAME",
                        help=f"Model family NAME: params with `families.NAME` applied{default}.")


FAMILY_OPTION = family_option()


class UserError(click.ClickException):
    """An expected error (bad params, concepts, data or model name): one line, exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"ktpipe: error: {self.message}", err=True)


# Operating-system errors that come from where the outputs go, not from a bug: a full disk, a folder
# that cannot be written, a file standing where a folder goes (or the reverse).
FULL = (errno.ENOSPC, errno.EDQUOT)
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
IN_THE_WAY = (errno.EEXIST, errno.ENOTDIR, errno.EISDIR)


def os_error_message(err: OSError) -> str | None:
    """One line for an OSError of FULL, UNWRITABLE or IN_THE_WAY; None for any other."""
    where = f"'{err.filename}'" if err.filename else "an output"
    if err.errno in FULL:
        return (f"cannot write {where}: {err.strerror}; free some space (DVC's cache: `dvc gc`, "
                "or move it with `dvc cache dir`) and rerun")
    if err.errno in UNWRITABLE:
        return f"cannot write {where}: {err.strerror}; make the output folder writable, or work in a writable clone"
    if err.errno in IN_THE_WAY:
        return (f"cannot write {where}: {err.strerror}; a file stands where ktpipe writes a folder, or the "
                "reverse: move it away and rerun")
    return None


def run_step(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a library step, turning a `KtpipeError`, and an OSError of a full disk or an unwritable
    output (`os_error_message`), into a one-line message and exit status 2 (any other exception is
    a bug and keeps its traceback)."""
    try:
        return fn(*args, **kwargs)
    except KtpipeError as err:
        raise UserError(str(err)) from err
    except OSError as err:
        message = os_error_message(err)
        if message is None:
            raise
        raise UserError(message) from err
    except RuntimeError as err:  # torch's strict load of weights that another architecture saved
        if not str(err).startswith("Error(s) in loading state_dict"):
            raise
        raise UserError(state_dict_message(str(err))) from err


def state_dict_message(torch_message: str) -> str:
    """One line for torch's `Error(s) in loading state_dict for <Model>: ...` (key lists of any length)."""
    kinds = [kind for needle, kind in (("Missing key(s)", "missing keys"), ("Unexpected key(s)", "unexpected keys"),
                                       ("size mismatch", "tensors of other shapes")) if needle in torch_message]
    model = torch_message.split("\n", 1)[0].removeprefix("Error(s) in loading state_dict for ").rstrip(":")
    return (f"cannot load the checkpoint into {model}: its weights do not fit the architecture ({', '.join(kinds)}); "
            "the checkpoint's config and its weights file, or model.name and the weights, are of different models")


def load_params(path: str, family: str | None = None):
    """The params file (of one model family), type-checked; a malformed one is a user error."""
    from ktpipe.params import load_params as read_params

    return run_step(read_params, path, family)


def exit_now(code: object) -> None:
    """Exit with `SystemExit`'s `code` (None: 0; a message: printed, 1) after the exit handlers.

    The interpreter's own teardown is skipped: with torch, torchvision and open_clip loaded it takes
    1.2 to 1.5 s on 2 cores (freeing every module, unloading torch's libraries), paid once per DVC
    stage (`python benchmarks/stage_startup.py` measures it). Outputs are written and closed by then.
    """
    if code is None or isinstance(code, int):
        status = code or 0
    else:
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()  # what a normal exit runs first: logging's flush, weakref finalizers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def observed() -> bool:
    """Whether a profiler, tracer or (Python 3.12+) monitoring tool watches this process."""
    monitoring = getattr(sys, "monitoring", None)
    tools = range(6) if monitoring else ()  # sys.monitoring's tool ids 0-5
    return (sys.getprofile() is not None or sys.gettrace() is not None
            or any(monitoring.get_tool(tool) is not None for tool in tools))


def run_command(command: click.Command) -> None:
    """Run a command as a program (a stage's `python -m stages.<stage>`, the `ktpipe` script).

    The process ends as soon as the command has returned, skipping the interpreter's teardown; a
    bug's traceback exits the usual way, and so does every run under a profiler or tracer
    (`python -m cProfile -m stages.invert ...`, coverage, a debugger), whose results are written at exit.

    A stage runs in a fork of the warm-start server where one runs (`ktpipe/warm.py`: its imports are
    done once per `dvc repro`, not once per stage); this process exits with the stage's status.
    """
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if (spec is not None and spec.name.startswith("stages.") and not os.environ.get("KTPIPE_WARM_FORK")
            and not observed() and "LOCAL_RANK" not in os.environ):  # a torchrun worker runs in its own process
        from ktpipe import warm

        status = warm.run_warm(spec.name)
        if status is not None:
            if status < 0:  # the stage was killed by a signal: so is this process
                signal.signal(-status, signal.SIG_DFL)
                os.kill(os.getpid(), -status)
            exit_now(status)
    try:
        command(prog_name="ktpipe")
    except SystemExit as done:  # click ends every command, failed or not, with SystemExit
        if observed():
            raise
        exit_now(done.code)
