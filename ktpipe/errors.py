"""Turn expected user errors into one clear line and a non-zero exit."""
from __future__ import annotations

import sys
from typing import Any, Callable

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
