"""Trainer processes forked from a warm interpreter, for the tests.

Each trainer a test starts is ``python -m difftrain.trainer`` in a process of its own,
with its own environment, pid, output pipe, signals and exit status; what a fresh
interpreter would spend first (about 7 s on two cores importing torch, diffusers,
transformers and peft) is spent once, by this server, which forks a child per run.
The child resets what the server set up (signals, standard streams, environment, CPU
threads) and runs the module as ``python -m`` would.

``DIFFTRAIN_TEST_FRESH_TRAINERS=1`` makes :func:`start` start fresh interpreters
instead; so does a run whose environment changes what the libraries read once, at import
(``HF_HUB_OFFLINE``, ``HF_ENDPOINT``). Tests of the pods' launcher
(torchrun) and of ``difftrain run`` always start fresh ones.

Protocol, over a Unix socket: the client sends one JSON line (``env``, ``cwd``) with the
write end of its output pipe attached (SCM_RIGHTS); the server answers ``pid N`` and,
when the child has ended, ``exit CODE`` (negative for a signal, as Popen reports it).
"""

import array
import atexit
import contextlib
import gc
import io
import json
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

MODULE = "difftrain.trainer"


# --- the server -------------------------------------------------------------------


def _warm_up() -> None:
    """Import what every trainer imports, including the modules diffusers and
    transformers import lazily on first use (each family's pipeline, whose module imports
    its models and tokenizers; a scheduler's list of compatible ones imports scipy.stats):
    about a second of each child's start otherwise. Imports only: nothing here may compute
    with torch, whose thread pools a fork does not carry over."""
    import diffusers
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import difftrain.trainer.__main__
    import difftrain.trainer.loop  # noqa: F401
    from difftrain.trainer import families

    for family in families.all_families():
        family.pipeline_class()
    for scheduler in (diffusers.DDPMScheduler, diffusers.FlowMatchEulerDiscreteScheduler):
        scheduler._get_compatibles()
    # transformers builds its table of checkpoint renamings (a thousand regular
    # expressions) at a model's first load; an internal function, hence the guard.
    with contextlib.suppress(ImportError, AttributeError):
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        get_checkpoint_conversion_mapping("clip_text_model")


def _child(request: dict, output: int) -> None:
    """In the forked child: become ``python -m difftrain.trainer``; never returns."""
    code = 1
    try:
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(number, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(output)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        # Unbuffered, as PYTHONUNBUFFERED makes a fresh interpreter's streams.
        sys.stdout, sys.stderr = (
            io.TextIOWrapper(
                io.FileIO(fd, "w", closefd=False),
                encoding="utf-8",
                errors="backslashreplace",
                line_buffering=True,
                write_through=True,
            )
            for fd in (1, 2)
        )
        import torch

        # Intra-op threads are fixed when torch loads: follow this run's OMP_NUM_THREADS.
        threads = os.environ.get("OMP_NUM_THREADS")
        torch.set_num_threads(int(threads) if threads else os.cpu_count() or 1)
        sys.argv = [MODULE]
        import runpy

        try:
            runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            if not isinstance(done.code, int | None):
                print(done.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # the child is ending either way
                stream.flush()
        os._exit(code)


def serve(path: str) -> None:
    """Accept run requests on the Unix socket ``path`` until stdin closes."""
    _warm_up()
    # What the imports made lives as long as the server: the children's garbage collector
    # need not walk it (a full collection took 0.3 s of a short run).
    gc.collect()
    gc.freeze()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ, "accept")
    selector.register(wake_read, selectors.EVENT_READ, "child")
    selector.register(sys.stdin, selectors.EVENT_READ, "stop")
    waiting: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        for key, _ in selector.select(timeout=1.0):
            if key.data == "stop":
                if not sys.stdin.buffer.read1(4096):
                    return  # the test session ended
            elif key.data == "accept":
                connection, _ = server.accept()
                request, output = _receive(connection)
                pid = os.fork()
                if pid == 0:
                    server.close()
                    connection.close()
                    for other in waiting.values():
                        other.close()
                    _child(request, output)
                os.close(output)
                waiting[pid] = connection
                connection.sendall(f"pid {pid}\n".encode())
            else:
                os.read(wake_read, 4096)
        while waiting:  # reap every ended child, on a signal or the timeout alike
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            connection = waiting.pop(pid, None)
            if connection:
                with contextlib.suppress(OSError):  # the test may be gone
                    connection.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                connection.close()


def _receive(connection: socket.socket) -> tuple[dict, int]:
    fds = array.array("i")
    data, ancillary, _, _ = connection.recvmsg(1 << 20, socket.CMSG_LEN(fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: fds.itemsize])
    while not data.endswith(b"\n"):
        data += connection.recv(1 << 20)
    return json.loads(data), fds[0]


# --- the client -------------------------------------------------------------------

_server: dict = {}
_lock = threading.Lock()


def _socket_path() -> str:
    with _lock:
        if "path" not in _server:
            folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"difftrain-forkserver-{os.getpid()}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "socket"
            path.unlink(missing_ok=True)
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.trainer.forkserver", str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).resolve().parents[2],
            )
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("the trainer fork server did not start")
            _server.update(path=str(path), process=process, env=dict(os.environ))
            atexit.register(stop_server)
        return _server["path"]


def stop_server() -> None:
    """End the server (at the end of the test session)."""
    process = _server.pop("process", None)
    _server.pop("path", None)
    if process:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Forked:
    """A trainer forked by the server, with the part of Popen's interface tests use."""

    def __init__(self, env: dict):
        self.args = [sys.executable, "-m", MODULE]
        read, write = os.pipe()
        self._control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._control.connect(_socket_path())
        message = (json.dumps({"env": env, "cwd": os.getcwd()}) + "\n").encode()
        self._control.sendmsg(
            [message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [write]))]
        )
        os.close(write)
        self.stdout = open(read, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
        self._buffer = b""
        self.pid = int(self._line(None).split()[1])
        self.returncode: int | None = None
        self._output: list[str] = []
        self._reader: threading.Thread | None = None

    def _line(self, timeout: float | None) -> str | None:
        """The server's next line, or None if none comes within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._control], [], [], left)
            if not ready:
                return None
            data = self._control.recv(4096)
            if not data:
                raise RuntimeError("the trainer fork server went away")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def poll(self) -> int | None:
        return self.wait(0) if self.returncode is None else self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                if timeout == 0:
                    return None  # poll()
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = int(line.split()[1])
            self._control.close()
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        """All output until the child closes it, then its exit code (as Popen's)."""
        if self._reader is None:
            self._reader = threading.Thread(
                target=lambda: self._output.append(self.stdout.read()), daemon=True
            )
            self._reader.start()
        self._reader.join(timeout)
        if self._reader.is_alive():
            raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(timeout)
        self.stdout.close()
        return "".join(self._output), None

    def send_signal(self, number: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, number)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# Variables the libraries (and the interpreter) read once, at import or start-up
# (HF_HUB_OFFLINE, HF_ENDPOINT, PYTHONHASHSEED): a run that sets them differently from
# the server needs a fresh interpreter. torch's and CUDA's settings are read when first
# used, in the child; OMP_NUM_THREADS the child applies itself. torch sets
# TORCHINDUCTOR_CACHE_DIR in the test process on its own, so torch's names must not count.
_READ_AT_IMPORT = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "PYTHON")
_APPLIED_BY_THE_CHILD = {"PYTHONUNBUFFERED"}


def _imports_differently(env: dict) -> bool:
    server = _server.get("env", os.environ)
    names = {*env, *server}
    return any(
        name.startswith(_READ_AT_IMPORT)
        and name not in _APPLIED_BY_THE_CHILD
        and env.get(name) != server.get(name)
        for name in names
    )


def start(env: dict) -> "Forked | subprocess.Popen":
    """``python -m difftrain.trainer`` with ``env``: forked, or fresh when asked or when
    ``env`` changes what the libraries read at import."""
    if os.environ.get("DIFFTRAIN_TEST_FRESH_TRAINERS") == "1" or _imports_differently(env):
        return subprocess.Popen(
            [sys.executable, "-m", MODULE],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return Forked(env)


if __name__ == "__main__":
    serve(sys.argv[1])
