"""One base class for every expected user error, and the one place that turns it into a clear
line and a non-zero exit (stages and the command line both catch `KtpipeError` only, so a
bug still shows its traceback)."""
from __future__ import annotations

import math
import sys
from typing import Any, Callable


class KtpipeError(ValueError):
    """An expected error in what the user gave (params, captions, data, model names): one line, exit 2."""


class InputMissingError(KtpipeError, FileNotFoundError):
    """A file or folder a step reads does not exist (often: an earlier stage has not run)."""


class NonFiniteError(KtpipeError):
    """A loss or gradient became NaN or infinite: the run stops rather than write broken weights."""


def check_finite(value: Any, what: str, where: str, step: int) -> None:
    """`value` is a float or a one-element tensor. Raise NonFiniteError naming `what` (loss, gradient), `where` (concept, recipe) and the step."""
    number = float(value.detach()) if hasattr(value, "detach") else float(value)
    if not math.isfinite(number):
        raise NonFiniteError(f"{where}: the {what} is {number} at step {step}; nothing was written. "
                             "Lower the learning rate, or check the model weights and input images")


def warn(message: str) -> None:
    """A warning in the stage output (stderr), one line."""
    print(f"ktpipe: warning: {message}", file=sys.stderr)


# ParamsError, CaptionsError, ModelLoadError, DatasetError and WorldError derive from KtpipeError.
USER_ERRORS = (KtpipeError,)
EXIT_USER_ERROR = 2


def run_or_exit(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call fn; on a user error print 'ktpipe: error: ...' and exit with status 2."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as err:
        print(f"ktpipe: error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from err


def stage_args(argv: list[str], names: list[str]) -> list[str]:
    """Positional stage arguments (from the `cmd` in dvc.yaml), or a usage error."""
    if len(argv) != len(names):
        print(f"usage: {sys.argv[0]} {' '.join(n.upper() for n in names)}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)
    return argv
