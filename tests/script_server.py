"""Script runs forked from an interpreter that has already imported the heavy libraries.

On this project's 2-core test machine `import torch, torchvision, timm, accelerate` costs
about 3.5 s of CPU, and the suite starts some sixty script runs; CPU is what the suite
waits for. The server imports them once; each run is then a fork of it:

    server = ScriptServer(env)                       # in the test process, once
    process = server.popen([sys.executable, "train.py", ...], env=..., cwd=...)
    out, err = process.communicate(timeout=600)      # what subprocess.Popen gives

Each run is still a process of its own, with its own pid, environment, working folder,
sys.argv, pipes, signals and exit status; the script runs as __main__ (runpy), and fixres
is imported afresh in it, as in a new interpreter. What differs from `python script`:
the libraries in PRELOAD were imported once, under the server's environment (the tests
give every run OMP_NUM_THREADS=1, and so the server). `python -m module` runs the same
way (torchrun's launcher: its workers are new interpreters).

    python tests/script_server.py SOCKET   # started by ScriptServer; serves until stdin closes
"""
from __future__ import annotations

import atexit
import json
import os
import runpy
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

PRELOAD = ("torch", "torchvision", "timm", "accelerate", "numpy", "PIL.Image", "pandas", "rich.console",
           "safetensors.torch", "matplotlib")
MESSAGE_BYTES = 1 << 20  # a request: the command and its environment


# ----------------------------------------------------------------------------- the server process

def run_child(request: dict, stdout: int, stderr: int) -> None:
    """In the forked child (the server's sockets closed): become the requested run, then exit
    with its status."""
    if request["new_session"]:
        os.setsid()
    for fd, target in ((os.open(os.devnull, os.O_RDONLY), 0), (stdout, 1), (stderr, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    command = request["command"][1:]  # after the interpreter
    status = 0
    try:
        if command[0] == "-m":
            sys.argv = [command[1], *command[2:]]
            sys.path[0] = request["cwd"]
            runpy.run_module(command[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = command
            sys.path[0] = str(Path(command[0]).resolve().parent)
            runpy.run_path(command[0], run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            status = exit_.code or 0
        else:  # sys.exit("message"), as the interpreter does it
            print(exit_.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    # what the interpreter does on its way out: wait for threads, run atexit, flush
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def serve(path: str) -> None:
    for name in PRELOAD:
        __import__(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(sys.stdin, selectors.EVENT_READ)  # readable at EOF: the test process has gone
    runs: dict[int, socket.socket] = {}  # pid -> the connection its status goes back on
    while True:
        for key, _ in selector.select(timeout=0.02):
            if key.fileobj is sys.stdin:
                return
            connection, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(connection, MESSAGE_BYTES, 2)
            pid = os.fork()
            if pid == 0:
                selector.close()
                for server_socket in [listener, connection, *runs.values()]:
                    server_socket.close()
                run_child(json.loads(message), *fds)
            for fd in fds:
                os.close(fd)
            connection.send(json.dumps({"pid": pid}).encode())
            runs[pid] = connection
        while runs:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = runs.pop(pid)
            connection.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
            connection.close()


# ----------------------------------------------------------------------------- in the test process

class ForkedProcess:
    """The part of subprocess.Popen (text=True, stdout and stderr piped) that the tests use."""

    def __init__(self, args: list[str], connection: socket.socket, stdout: int, stderr: int):
        self.args = args
        self.returncode: int | None = None
        self._connection = connection
        self.pid: int = json.loads(connection.recv(MESSAGE_BYTES))["pid"]
        self.stdout = open(stdout, encoding="utf-8", errors="replace")
        self.stderr = open(stderr, encoding="utf-8", errors="replace")
        self._text: list[list[str]] = [[], []]  # stdout's and stderr's, each appended whole at its end
        self._readers: list[threading.Thread] = []

    def _status_arrived(self, timeout: float | None) -> bool:
        if self.returncode is None:
            if not select.select([self._connection], [], [], timeout)[0]:
                return False
            self.returncode = json.loads(self._connection.recv(MESSAGE_BYTES))["returncode"]
            self._connection.close()
        return True

    def poll(self) -> int | None:
        self._status_arrived(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._status_arrived(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Both outputs whole and the exit status; TimeoutExpired leaves the reading going, so
        that a later call (after kill()) still returns everything."""
        if not self._readers:
            self._readers = [threading.Thread(target=lambda s=stream, t=text: t.append(s.read()), daemon=True)
                             for stream, text in zip((self.stdout, self.stderr), self._text)]
            for reader in self._readers:
                reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())
        for reader in self._readers:
            reader.join(left())
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(left())
        return "".join(self._text[0]), "".join(self._text[1])

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class ScriptServer:
    """Starts the server (its imports take a few seconds, once) and forks runs from it."""

    def __init__(self, env: dict[str, str]):
        self._folder = tempfile.TemporaryDirectory(prefix="script-server-")
        self._path = os.path.join(self._folder.name, "socket")
        self._server = subprocess.Popen([sys.executable, __file__, self._path], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        if self._server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the script server did not start (exit {self._server.wait()})")

    def popen(self, command: list[str], *, env: dict[str, str], cwd, start_new_session: bool = False) -> ForkedProcess:
        """`command` ([sys.executable, script, args...] or [sys.executable, "-m", module, args...])
        run as a fork of the server; its stdout and stderr come back through pipes."""
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        connection.connect(self._path)
        stdout_read, stdout_write = os.pipe()
        stderr_read, stderr_write = os.pipe()
        request = {"command": [str(part) for part in command], "env": dict(env), "cwd": str(cwd),
                   "new_session": start_new_session}
        socket.send_fds(connection, [json.dumps(request).encode()], [stdout_write, stderr_write])
        os.close(stdout_write)
        os.close(stderr_write)
        return ForkedProcess(list(command), connection, stdout_read, stderr_read)

    def close(self) -> None:
        self._server.stdin.close()
        self._server.wait(timeout=30)
        self._folder.cleanup()


_shared_lock = threading.Lock()
_shared: list[ScriptServer] = []


def shared_server() -> ScriptServer:
    """The test session's server, started on first use with the one torch thread that
    conftest.start_script gives every run (libgomp reads it when torch is imported), closed when
    the session's interpreter exits. Here rather than in conftest.py, which is imported twice (as
    conftest, and as tests.conftest by the files that run as scripts too)."""
    with _shared_lock:
        if not _shared:
            _shared.append(ScriptServer({**os.environ, "OMP_NUM_THREADS": "1"}))
            atexit.register(_shared[0].close)
        return _shared[0]


if __name__ == "__main__":
    serve(sys.argv[1])
