"""`python -m ktpipe <stage> ...`: how `dvc.yaml` runs each stage.

The process ends as soon as the command has returned: its outputs are written and closed by then,
the exit handlers run and stdout and stderr are flushed, but the interpreter's own teardown is
skipped. With torch, torchvision and open_clip loaded that teardown (freeing every module and
unloading torch's libraries) takes 1.2 to 1.5 s on 2 cores, and `dvc repro` would pay it once per
stage (`python benchmarks/stage_startup.py` measures it). A bug's traceback exits the usual way, and
so does every run under a profiler or tracer (`python -m cProfile -m ktpipe ...`, coverage, a
debugger), whose results are written at the interpreter's exit.
"""
import atexit
import os
import sys

from ktpipe.cli import main


def exit_now(code: object) -> None:
    """Exit with `SystemExit`'s `code` (None: 0; a message: printed, 1) after the exit handlers."""
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


try:
    main(prog_name="ktpipe")
except SystemExit as done:  # click ends every command, failed or not, with SystemExit
    if observed():
        raise
    exit_now(done.code)
