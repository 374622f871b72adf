"""Turn expected user errors into one clear line and a non-zero exit."""
from __future__ import annotations

import math
import sys
from typing import Any, Callable


class NonFiniteError(ValueError):
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


# ParamsError, CaptionsError, ModelLoadError and DatasetError all derive from ValueError.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)
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
