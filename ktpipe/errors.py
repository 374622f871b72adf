"""One base class for every expected user error. The command line (`ktpipe.cli.run_step`, which
every stage runs through) turns a `KtpipeError` into one clear line and exit status 2 and catches
nothing else, so a bug still shows its traceback. ParamsError, ConceptsError, ModelLoadError,
DatasetError and WorldError derive from it."""
from __future__ import annotations

import math
import sys
from typing import Any


class KtpipeError(ValueError):
    """An expected error in what the user gave (params, concepts, data, model names): one line, exit 2."""


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
