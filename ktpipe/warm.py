"""Warm starts for DVC stages: one process holds the heavy libraries imported, and each stage runs in
a fork of it instead of importing them again.

A stage process (`python -m stages.<stage>`) spends 7-18 s importing torch, torchvision, open_clip,
transformers and MONAI before its own work, once per stage of every `dvc repro` and `dvc exp run`.
The first stage of a run starts a server in the background (`python ktpipe/warm.py serve SOCKET`,
standard library only until it imports the libraries) and runs itself as usual; every later stage
connects to the server's Unix socket and passes it its argv, working directory, environment,
`sys.path` and its stdin, stdout and stderr (the file descriptors themselves). The server forks,
the fork takes them on and runs the stage module as `__main__`; the stage's exit status comes back
and the connecting process exits with it. ktpipe's own code is never imported by the server, so a
fork always runs the code on disk, as a fresh process would.

The stage is a fork, not a child of the process DVC started, so the connecting process stands in
for it: SIGINT, SIGTERM and SIGHUP it receives are passed on, and when it dies (a SIGKILL, the OOM
killer) the stage and whatever it started are killed at once, so nothing is written after DVC has
recorded the failure. The server exits after `KTPIPE_WARM_IDLE` seconds (300) without a stage.

One server serves every stage whose environment agrees on what the imported libraries read when
imported (the variables of `KEY_PREFIXES`: thread counts, CUDA, hubs' offline switches, ...): another
value starts another server. It never touches CUDA (a fork cannot use CUDA initialized before it).
`KTPIPE_WARM=0` turns it off: every stage imports its libraries itself. Linux only (fork); under a
profiler or tracer a stage always runs in its own process.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

PRELOAD = ("numpy", "PIL.Image", "yaml", "click", "tqdm", "safetensors.torch", "torch", "torchvision",
           "open_clip", "transformers", "transformers.models.vilt.modeling_vilt", "monai", "pandas", "pyarrow",
           "pyarrow.parquet", "matplotlib.pyplot")
KEY_PREFIXES = ("PYTHON", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "CUDA_", "NVIDIA_", "PYTORCH_", "TORCH", "HF_",
                "TRANSFORMERS_", "TOKENIZERS_", "MONAI_", "MPL", "LD_", "KTPIPE_WARM")
KEY_IGNORED = {"PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONIOENCODING"}  # set per stage, in the fork
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MAX_SOCKET_PATH = 100  # bytes; Linux's sun_path holds 108 with its terminating NUL
LENGTH = struct.Struct("!I")
STATUS = struct.Struct("!i")


def enabled() -> bool:
    return sys.platform == "linux" and os.environ.get("KTPIPE_WARM", "1") != "0"


def socket_path() -> Path:
    """This environment's server socket: in $KTPIPE_WARM_DIR, else a folder of the user's in /tmp."""
    folder = Path(os.environ.get("KTPIPE_WARM_DIR") or f"/tmp/ktpipe-warm-{os.getuid()}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to another user")
    folder.chmod(0o700)  # the socket runs code as this user: nobody else may connect
    key = {"python": [sys.executable, sys.version], "server": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
           "installed": installed(),
           "env": sorted((k, v) for k, v in os.environ.items() if k.startswith(KEY_PREFIXES) and k not in KEY_IGNORED),
           "preload": PRELOAD}
    return folder / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.sock"


def installed() -> list[tuple[str, int]]:
    """The folders the preloaded libraries are installed in, with their modification times: `pip
    install` or `uninstall` adds or removes a `.dist-info` folder there, so a server started
    before it is not used after it."""
    import importlib.util

    folders = set()
    for name in {name.split(".")[0] for name in PRELOAD}:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            folders.add(str(Path(spec.origin).parent.parent))
    return sorted((folder, os.stat(folder).st_mtime_ns) for folder in folders)


# --- the stage's side ----------------------------------------------------------------------------

def run_warm(module: str) -> int | None:
    """Run stage `module` (with this process's argv, directory and environment) in a fork of the
    server; its exit status (negative: killed by that signal), or None where no server runs yet (one
    is started for the next stage) and the caller runs the stage itself."""
    if not enabled():
        return None
    path = socket_path()
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:  # a Unix socket cannot be bound there: no server
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        start_server(path)
        return None
    with conn:
        request = json.dumps({"module": module, "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ),
                              "path": sys.path}).encode()
        sys.stdout.flush()
        sys.stderr.flush()
        socket.send_fds(conn, [LENGTH.pack(len(request))], [0, 1, 2])
        conn.sendall(request)
        for signum in SIGNALS:  # passed on to the stage
            signal.signal(signum, lambda signum, frame: conn.send(bytes([signum])))
        try:
            return STATUS.unpack(recv_exactly(conn, STATUS.size))[0]
        except ConnectionError:
            print("ktpipe: error: the warm-start server ended before the stage did; run it again, or set "
                  "KTPIPE_WARM=0", file=sys.stderr)
            return 1


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    """`size` bytes from `conn` (recv retries after a signal handler by itself, PEP 475)."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the other end closed the connection")
        data += chunk
    return data


def start_server(path: Path) -> None:
    """Start the server for `path` in the background (it exits at once where another is starting)."""
    import subprocess

    log = path.with_suffix(".log").open("ab")
    with log:
        subprocess.Popen([sys.executable, __file__, "serve", str(path)], stdin=subprocess.DEVNULL, stdout=log,
                         stderr=log, cwd="/", start_new_session=True, close_fds=True)


def stop_servers(folder: Path) -> int:
    """Stop every server of `folder` (SIGTERM to each running one); how many were stopped."""
    stopped = 0
    for lock_path in Path(folder).glob("*.lock"):
        with open(lock_path) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                continue  # free: no server holds it
            except BlockingIOError:
                pid = int(lock.read().strip() or 0)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                stopped += 1
    return stopped


# --- the server's side ---------------------------------------------------------------------------

def serve(path: Path, idle: float) -> None:
    lock = open(path.with_suffix(".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until this server exits
    except BlockingIOError:
        return  # another server for this environment is starting or running
    lock.write(str(os.getpid()))
    lock.flush()
    import importlib

    start = time.monotonic()
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialized while importing; forks could not use it")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    listener.bind(str(path))
    listener.listen(16)
    listener.settimeout(idle)
    print(f"warm-start server {os.getpid()}: imports took {time.monotonic() - start:.1f} s; serving {path}", flush=True)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sessions are reaped by the kernel
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                break
            if os.fork() == 0:
                listener.close()
                lock.close()
                serve_stage(conn)  # never returns
            conn.close()
    finally:
        if listener.fileno() >= 0:
            path.unlink(missing_ok=True)


def serve_stage(conn: socket.socket) -> None:
    """In a fork of the server: run one stage in a fork of its own, pass on the signals the
    connecting process forwards, kill the stage if that process dies, and send back its exit status."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        conn.settimeout(None)
        header, fds, _, _ = socket.recv_fds(conn, LENGTH.size, 3)
        request = json.loads(recv_exactly(conn, LENGTH.unpack(header)[0]))
        pid = os.fork()
        if pid == 0:
            conn.close()
            run_stage(request, fds)  # never returns
        for fd in fds:
            os.close(fd)

        def forward() -> None:
            while True:
                try:
                    received = conn.recv(1)
                except OSError:
                    received = b""
                try:
                    os.killpg(pid, received[0] if received else signal.SIGKILL)
                except ProcessLookupError:
                    return
                if not received:
                    return

        threading.Thread(target=forward, daemon=True).start()
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        conn.sendall(STATUS.pack(code))
    finally:
        os._exit(0 if code >= 0 else 1)


def run_stage(request: dict, fds: list[int]) -> None:
    """In the stage's fork: become the process the client would have been, run the module, exit."""
    code: object = 1
    try:
        os.setpgid(0, 0)  # the stage and whatever it starts: killed together
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ["KTPIPE_WARM_FORK"] = "1"
        os.chdir(request["cwd"])
        sys.path[:] = request["path"]
        sys.argv = list(request["argv"])
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        sys.stdin = io.TextIOWrapper(io.open(0, "rb", closefd=False), encoding="utf-8", errors="strict")
        for name, fd in (("stdout", 1), ("stderr", 2)):
            interactive = os.isatty(fd)
            stream = io.open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)
            setattr(sys, name, io.TextIOWrapper(stream, encoding="utf-8", errors="backslashreplace" if fd == 2
                                                else "strict", line_buffering=interactive or fd == 2,
                                                write_through=unbuffered))
        import runpy

        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = done.code
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    if code is None or isinstance(code, int):
        status = code or 0
    else:
        print(code, file=sys.stderr)
        status = 1
    try:
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]  # this file's folder (ktpipe/, with its io.py) shadows nothing the libraries import
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        sys.exit(f"usage: python {sys.argv[0]} serve SOCKET")
    serve(Path(sys.argv[2]), float(os.environ.get("KTPIPE_WARM_IDLE", "300")))
