"""Warm starts (ktpipe/warm.py): a stage run in a fork of the server behaves as the process it replaces.

A probe stage (a `stages.probe` module in a temporary folder, run as `python -m stages.probe`, the way
dvc.yaml runs a stage) prints what it sees; the first run finds no server, runs itself and starts
one; later runs are forks of that server: the same argv, directory, environment, output streams and
exit status, the code on disk as it is now, signals passed on, and a killed caller's stage killed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO

PROBE = '''
import json, os, sys, time
import click
from ktpipe.cli import run_command

@click.command()
@click.argument("word")
@click.option("--code", default=0)
@click.option("--sleep", default=0.0)
def command(word, code, sleep):
    print(json.dumps({"word": word, "version": VERSION, "cwd": os.getcwd(), "argv": sys.argv[1:],
                      "probe": os.environ.get("PROBE"), "fork": os.environ.get("KTPIPE_WARM_FORK"),
                      "pid": os.getpid(), "torch": "torch" in sys.modules}), flush=True)
    print("to stderr", file=sys.stderr)
    time.sleep(sleep)
    sys.exit(code)

VERSION = 1

if __name__ == "__main__":
    run_command(command)
'''


def write_probe(root: Path) -> Path:
    """`root` holding the probe stage as stages/probe.py."""
    (root / "stages").mkdir(parents=True)
    (root / "stages/__init__.py").write_text("")
    (root / "stages/probe.py").write_text(PROBE)
    return root


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """A folder with the probe stage, a warm-start folder of its own, and the server started."""
    root = write_probe(tmp_path_factory.mktemp("warm"))
    env = {**os.environ, "KTPIPE_WARM_DIR": str(root / "servers"), "KTPIPE_WARM_IDLE": "600", "PROBE": "first",
           "PYTHONPATH": os.pathsep.join([str(root), str(REPO)])}
    first = run(root, env, "cold")
    assert first["fork"] is None and not first["torch"]  # no server yet: the probe ran itself
    deadline = time.monotonic() + 120
    while not list((root / "servers").glob("*.sock")):  # the server it started is ready
        assert time.monotonic() < deadline, (root / "servers").glob("*.log")
        time.sleep(0.5)
    yield root, env
    from ktpipe.warm import stop_servers

    stop_servers(root / "servers")


def run(root: Path, env: dict, *args: str, code: int = 0) -> dict:
    result = subprocess.run([sys.executable, "-m", "stages.probe", *args], cwd=root, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == code, result.stderr
    assert result.stderr.splitlines()[-1] == "to stderr"
    return json.loads(result.stdout)


def test_a_fork_sees_what_the_process_would(probe, tmp_path):
    root, env = probe
    (tmp_path / "stages").symlink_to(root / "stages")
    seen = run(tmp_path, {**env, "PROBE": "second"}, "warm", "--code", "3", code=3)
    assert seen["fork"] == "1" and seen["torch"]  # a fork of the server, with its imports
    assert seen["word"] == "warm" and seen["argv"] == ["warm", "--code", "3"]
    assert seen["cwd"] == str(tmp_path) and seen["probe"] == "second"


def test_a_fork_runs_the_code_on_disk(probe):
    root, env = probe
    path = root / "stages/probe.py"
    path.write_text(PROBE.replace("VERSION = 1", "VERSION = 2"))
    try:
        assert run(root, env, "edited")["version"] == 2
    finally:
        path.write_text(PROBE)


def test_another_thread_count_gets_its_own_server(probe):
    root, env = probe
    seen = run(root, {**env, "OMP_NUM_THREADS": "7"}, "other")
    assert seen["fork"] is None  # torch was imported under another OMP_NUM_THREADS: not this server's
    assert run(root, {**env, "KTPIPE_WARM": "0"}, "off")["fork"] is None


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT])
def test_a_signal_to_the_caller_reaches_the_stage(probe, signum):
    root, env = probe
    caller = subprocess.Popen([sys.executable, "-m", "stages.probe", "wait", "--sleep", "60"], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = json.loads(caller.stdout.readline())
    assert seen["fork"] == "1" and seen["pid"] != caller.pid
    stage = psutil.Process(seen["pid"])
    caller.send_signal(signum)
    # SIGKILL: the caller dies, and the stage with it; SIGINT: the stage stops as its own process would
    # (click's "Aborted!", exit status 1), and the caller exits with its status
    assert caller.wait(timeout=30) == (-signum if signum == signal.SIGKILL else 1)
    stage.wait(timeout=10)
    assert not stage.is_running()
    if signum == signal.SIGINT:
        assert caller.stderr.read().splitlines()[-1] == "Aborted!"


def test_an_install_beside_the_libraries_retires_the_server(tmp_path, monkeypatch):
    """`pip install` adds a .dist-info folder where the preloaded libraries live: the socket (the
    server) of the same environment changes, so no fork runs the libraries of before."""
    from ktpipe import warm

    (tmp_path / "site/fakelib").mkdir(parents=True)
    (tmp_path / "site/fakelib/__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(warm, "PRELOAD", ("fakelib",))
    monkeypatch.setenv("KTPIPE_WARM_DIR", str(tmp_path / "servers"))
    before = warm.socket_path()
    assert warm.socket_path() == before
    (tmp_path / "site/fakelib-2.0.dist-info").mkdir()
    os.utime(tmp_path / "site", ns=(1, os.stat(tmp_path / "site").st_mtime_ns + 10**9))
    assert warm.socket_path() != before


def test_a_folder_too_deep_for_a_socket_runs_every_stage_itself(tmp_path):
    """A Unix socket's path holds about 100 bytes: under a deeper $KTPIPE_WARM_DIR no server is started
    (each would import every library, then fail to bind), and the stage runs in its own process."""
    deep = tmp_path / ("d" * 120)
    root = write_probe(tmp_path / "project")
    env = {**os.environ, "KTPIPE_WARM_DIR": str(deep), "PYTHONPATH": os.pathsep.join([str(root), str(REPO)])}
    assert run(root, env, "deep")["fork"] is None
    assert not list(deep.glob("*.log"))  # no server was started
