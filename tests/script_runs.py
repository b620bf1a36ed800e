"""How the tests run train.py, sweep.py and finetune.py: in this process, or as real interpreters.

    result = run_in_process("train.py", "--data", csv, ...)    # its main(argv) here, as `python train.py` would
    result = run_file_in_process(path, "--help")               # a file run as __main__ here (a benchmark)
    result = run_script("train.py", "--data", csv, ...)        # `python train.py ...` in a new interpreter
    process = start_script("train.py", ..., processes=2)       # torchrun, in the background; finish(process)

Both give a subprocess.CompletedProcess (returncode, stdout, stderr). `import torch, timm,
accelerate` costs about 3.5 s of CPU per interpreter on this project's 2-core test machine, so
a run that needs nothing a process gives runs in this process: through the script's main(argv)
and fixres.cli.run_main (the exit status and one-line errors of the script), with its own
stdout and stderr, argv, working folder (the repository, as for a real run), environment
(OMP_NUM_THREADS=1, and `env`), one torch thread, and a fresh Accelerate state; whatever the run
changes in the process is put back after it (`in_a_run`: signal handlers, the environment,
torch's random generator, threads and flags, logging, warnings filters, matplotlib's settings,
a process group). What it cannot give: what an interpreter reads when it starts or imports
(a variable read at import, sitecustomize), what it does when it ends (atexit, a crash in the
teardown of a library), signals sent to it, several processes. Runs that need one of those,
or a timeout, start a real interpreter (start_script; 2-process runs that should finish share
one launch: start_together, tests/launch_runs.py); Started runs several in the background,
on the cores this process leaves idle, each collected when a test first asks for it: conftest's
early_runs starts them with the session (a test file's start_early), or a fixture once what the
run needs is there, and a test that reads such a run is marked `late` (it runs after the others).

Here rather than in conftest.py, which is imported twice (as conftest, and as tests.conftest
by the files that run as scripts too): one script_main cache, one module of each script.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import io
import logging
import os
import random
import runpy
import signal
import socket
import subprocess
import sys
import threading
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, GradientState, PartialState

from fixres.cli import run_main

ROOT = Path(__file__).resolve().parents[1]
RUN_ENV = {"OMP_NUM_THREADS": "1"}  # every run computes on one core, as on the 2-core test machine


# ----------------------------------------------------------------------------- real interpreters

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_command(script, processes: int = 1, port: int | None = None) -> list[str]:
    """`python script`, or torchrun with `processes` processes on a free port (or `port`)."""
    if processes == 1:
        return [sys.executable, str(ROOT / script)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            f"--master_port={port or free_port()}", str(ROOT / script)]


# Runs started by a thread of Started (in the background, beside this process's own work) run at a
# lower priority: the test process, whose work is the longest chain of the suite, keeps a core, and
# they take the rest (on the 2-core test machine: the other core, and this one while it waits).
BACKGROUND_NICENESS = 10
_thread = threading.local()


# The environment as the session began: what a background thread gives the processes it starts,
# since a run in this process (in_a_run), or a test's monkeypatch, changes os.environ meanwhile
SESSION_ENVIRON = dict(os.environ)


def background_niceness() -> int | None:
    """The niceness of what this thread starts, where it is a background thread of Started; else None."""
    return getattr(_thread, "niceness", None)


def environ() -> dict:
    """A copy of the environment for a new process: the session's in a background thread of
    Started, this process's own (as a test has set it) otherwise."""
    return dict(SESSION_ENVIRON) if background_niceness() is not None else dict(os.environ)


def niced(command: list[str]) -> list[str]:
    """`command`, under `nice` when started from a background thread of Started."""
    niceness = background_niceness()
    return ["nice", "-n", str(niceness), *command] if niceness else command


def lower_autogroup(pid: int, niceness: int = BACKGROUND_NICENESS) -> None:
    """The niceness of the autogroup of process `pid`: where Linux groups processes by session (its
    autogroups, the default), a process in a session of its own shares the CPU as a group, whatever
    its nice value, with this session's group. Nothing where there are no autogroups, nor where
    the kernel refuses (a user without CAP_SYS_NICE may lower one autogroup each 100 ms)."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(niceness))
    except OSError:
        pass


def lower_autogroups_naming(marker: str, niceness: int = BACKGROUND_NICENESS) -> None:
    """lower_autogroup of every process whose command line names `marker` (a folder of this session:
    jobs that another program started, SLURM's, each in a session of its own)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                lower_autogroup(int(proc.name), niceness)
        except OSError:  # ended meanwhile
            pass


def start_script(script, *args, processes: int = 1, port: int | None = None, env=None, **popen) -> subprocess.Popen:
    """`python script ARGS` (or under torchrun) started in the background in a new interpreter, as a
    user starts it, from the repository, one thread a process; finish() collects it. `popen`:
    subprocess.Popen's own keywords (preexec_fn, start_new_session). `nice` execs the interpreter
    (niced): the process, its pid and exit status are the interpreter's."""
    command = niced(script_command(script, processes, port) + [str(a) for a in args])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**environ(), **RUN_ENV, **(env or {})}, **popen)
    if popen.get("start_new_session") and background_niceness():  # its session's autogroup: niced too
        lower_autogroup(process.pid, background_niceness())
    return process


def finish(process: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """Its exit status and output; killed and reported if it runs past `timeout`."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"still running after {timeout} s\n{out[-2000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run_script(script: str, *args, processes: int = 1, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    """`python script ...` (or torchrun) in a new interpreter, waited for: for what only a process gives."""
    return finish(start_script(script, *args, processes=processes, env=env), timeout)


# ----------------------------------------------------------------------------- in this process

@functools.cache
def script_main(script: str):
    """The `main(argv)` of a top-level script (train.py, sweep.py, finetune.py), imported by path."""
    spec = importlib.util.spec_from_file_location(f"{Path(script).stem}_script", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_in_process(script: str, *args, env=None, capsys=None) -> subprocess.CompletedProcess:
    """What run_script gives, from the script's main(argv) run in this process (in_a_run): run_main's
    exit status (argparse's own for options it refuses, 1 and the traceback for an exception) and
    what the run printed. `capsys` (a test's): what it captured before is dropped, as before
    runs captured their own output."""
    argv = [str(a) for a in args]
    if capsys is not None:
        capsys.readouterr()
    return _captured([str(ROOT / script), *argv], env, lambda: run_main(script_main(script), argv), shown=[script, *argv])


def run_file_in_process(path, *args) -> subprocess.CompletedProcess:
    """`python path ARGS` for a file run as __main__ (a benchmark's script), in this process as a new
    interpreter would run it: sys.path starts with the file's folder and holds no entry in the
    repository, and no module of fixres or of the scripts is imported yet (those of this process
    are put aside, and back after), so a file that cannot import fixres from where it is fails
    here too. The modules of tests/ stay (the background threads of this process use them)."""
    path = Path(path).resolve()
    argv = [str(path), *map(str, args)]

    def run_as_main() -> int:
        sys.path[:] = [str(path.parent)] + [p for p in sys.path if not Path(p or ".").resolve().is_relative_to(ROOT)]
        aside = {name: sys.modules.pop(name) for name in list(sys.modules) if _of_the_repository(sys.modules[name])}
        try:
            runpy.run_path(str(path), run_name="__main__")
        finally:
            for name in [name for name, module in sys.modules.items() if _of_the_repository(module)]:
                del sys.modules[name]
            sys.modules.update(aside)
        return 0
    return _captured(argv, None, run_as_main)


def _of_the_repository(module) -> bool:
    """A module of fixres or of a script beside the benchmarks (not of tests/, which runs this)."""
    file = getattr(module, "__file__", None) or ""  # strings, not Paths: thousands of modules a run
    return file.startswith(f"{ROOT}{os.sep}") and not file.startswith(f"{ROOT / 'tests'}{os.sep}")


def _captured(argv: list[str], env, run, shown=None, keep_process_group=False) -> subprocess.CompletedProcess:
    """run() in a run of `argv` (in_a_run): its exit status, as the interpreter ends on what it
    returns or raises, and what it printed (as a CompletedProcess of `shown`, or of argv)."""
    out, err = _Output(), _Output()
    with in_a_run(argv, env, keep_process_group), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = run()
        except SystemExit as exit_:  # as the interpreter ends on it
            status = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
            if not isinstance(exit_.code, (int, type(None))):
                print(exit_.code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            status = 1
    return subprocess.CompletedProcess(shown or argv, status, out.getvalue(), err.getvalue())


class _Output(io.TextIOWrapper):
    """A text stream that keeps what was written (pytest's own capture is one too): not a terminal,
    UTF-8, as a pipe is to a real run."""

    def __init__(self):
        super().__init__(io.BytesIO(), encoding="utf-8", newline="\n", write_through=True)

    def getvalue(self) -> str:
        return self.buffer.getvalue().decode("utf-8")


def reset_accelerate() -> None:
    """Accelerate's process-wide state (one per interpreter) forgotten: the next Accelerator starts afresh."""
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    GradientState._reset_state()


HANDLED_SIGNALS = [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]


def signal_handlers() -> dict:
    """Every signal's Python-level handler (fixres.stopping installs SIGTERM, SIGINT and SIGUSR1's)."""
    return {s: signal.getsignal(s) for s in HANDLED_SIGNALS}


def logging_state() -> dict:
    loggers = [logging.root, *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    return {logger: (logger.handlers[:], logger.level, logger.propagate, logger.disabled) for logger in loggers}


def flushes_denormals() -> bool:
    """torch.set_flush_denormal has no getter: whether a denormal double survives a multiplication."""
    return (torch.tensor([1e-310], dtype=torch.float64) * 1.0).item() == 0.0


class ProcessState:
    """What a run may change in the process that runs it, taken before and put back after."""

    def __init__(self):
        self.argv, self.cwd, self.environ, self.path = sys.argv[:], os.getcwd(), dict(os.environ), sys.path[:]
        self.signals = signal_handlers()
        self.rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        self.torch = (torch.get_num_threads(), torch.get_default_dtype(), flushes_denormals(),
                      torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                      torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_float32_matmul_precision(),
                      torch.is_grad_enabled())
        self.logging = (logging_state(), logging.root.manager.disable)
        self.threads = set(threading.enumerate())
        self.collector = (gc.isenabled(), gc.get_freeze_count())

    def restore(self) -> None:
        sys.argv[:], sys.path[:] = self.argv, self.path
        os.chdir(self.cwd)
        os.environ.clear()
        os.environ.update(self.environ)
        for s, handler in self.signals.items():
            if handler is not None and signal.getsignal(s) is not handler:  # None: installed outside Python
                signal.signal(s, handler)
        torch.set_rng_state(self.rng[0])
        np.random.set_state(self.rng[1])
        random.setstate(self.rng[2])
        (threads, dtype, flush, benchmark, deterministic, algorithms, warn_only, matmul, grad) = self.torch
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.set_flush_denormal(flush)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic
        torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
        torch.set_float32_matmul_precision(matmul)
        torch.set_grad_enabled(grad)
        loggers, disable = self.logging
        for logger, (handlers, level, propagate, disabled) in loggers.items():
            logger.handlers[:], logger.level, logger.propagate, logger.disabled = handlers, level, propagate, disabled
        for logger in logging_state().keys() - loggers.keys():  # made by the run: no handler of its outlives it
            logger.handlers[:] = [h for h in logger.handlers if isinstance(h, logging.NullHandler)]
        logging.disable(disable)
        enabled, frozen = self.collector  # a script run as __main__ turns the collector off, run_main freezes
        if frozen == 0 and gc.get_freeze_count():
            # what the run froze goes back to the collector (had objects been frozen before the run, none
            # are in the suite, its freeze would stay)
            gc.unfreeze()
        (gc.enable if enabled else gc.disable)()


@contextlib.contextmanager
def in_a_run(argv: list[str], env=None, keep_process_group: bool = False):
    """The process as a new interpreter would give it to `argv`, and as it was once the run ends:
    sys.argv, the repository as working folder, the environment with RUN_ENV and `env`, one torch
    thread, a fresh Accelerate state; after it, everything in ProcessState put back, the process
    group ended (but with `keep_process_group`: torchrun's, for the next run of a launch),
    non-daemon threads of the run waited for (as the interpreter does at its exit)."""
    before = ProcessState()
    reset_accelerate()  # what a test built (an Accelerator of its own) is no state of the run's
    sys.argv[:] = argv
    os.chdir(ROOT)
    os.environ.update({**RUN_ENV, **(env or {})})
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(), matplotlib_settings():
            yield
    finally:
        try:
            if dist.is_available() and dist.is_initialized() and not keep_process_group:
                dist.destroy_process_group()
            for thread in set(threading.enumerate()) - before.threads:
                if not thread.daemon:
                    thread.join(timeout=60)
                    assert not thread.is_alive(), f"the run left thread {thread.name} running"
        finally:
            reset_accelerate()
            before.restore()


@contextlib.contextmanager
def matplotlib_settings():
    """matplotlib's rcParams as they were, and no pyplot figure of the run left open (fixres draws on
    its own Figure objects; this holds it to that)."""
    if "matplotlib" not in sys.modules:  # a run that imports it first leaves its defaults only
        yield
        return
    import matplotlib
    pyplot = sys.modules.get("matplotlib.pyplot")
    figures = set(pyplot.get_fignums()) if pyplot else set()
    with matplotlib.rc_context():
        yield
    pyplot = sys.modules.get("matplotlib.pyplot")
    for number in set(pyplot.get_fignums()) - figures if pyplot else ():
        pyplot.close(number)


# ----------------------------------------------------------------------------- runs side by side

TOGETHER = "the launch of the 2-process runs started together"

class Started:
    """Script runs started together in the background, each collected when a test first asks
    for it (`started[name]`): the scripts run one thread each, so on a machine of few cores
    runs side by side use the cores that this process leaves idle. With `at_once`, no more
    real runs than that at a time, the others waiting in the order they were started, and a
    run a test asks for starts at once. A run started with `in_process=True` is done in this
    process instead, when a test first asks for it (none: never), while the real ones go on
    beside it. Waits that need no core of this process (jobs of another program, a daemon
    starting) run in a thread (call)."""

    def __init__(self, at_once: int | None = None):
        self.at_once = at_once
        self.later: dict[str, tuple] = {}  # in-process runs not asked for yet: (script, args, env)
        self.results: dict[str, subprocess.CompletedProcess] = {}
        self.folders: dict[str, Path] = {}  # the run folder of each, where one was given
        self.threads: dict[str, threading.Thread] = {}  # a real run's, or a call's
        self.outcomes: dict[str, tuple[object, BaseException | None]] = {}  # (result, what it raised)
        self.at_end_calls: list = []
        self._turns = threading.Condition()
        self._waiting: list[str] = []  # real runs not started yet, in order
        self._running = 0
        self._asked: set[str] = set()
        self._closing = False  # collect_all: a real run still waiting for its turn is not started
        self.together: list[tuple] = []  # start_together's runs: (name, script, args)
        self.in_launch: dict[str, Path] = {}  # launch_together's runs: the folder of their outputs

    def start(self, name: str, script, *args, folder: Path | None = None, in_process: bool = False,
              first: bool = False, **kwargs) -> None:
        """A real interpreter (start_script's keywords), or `in_process` when a test asks for it. With
        `first`, before the real runs that wait for their turn (the head of a long chain of runs)."""
        if in_process:
            # a run that needs a process (several, a preexec_fn, ...) starts one
            assert kwargs.keys() <= {"env", "processes"} and kwargs.get("processes", 1) == 1, kwargs
            self.later[name] = (script, args, kwargs.get("env"))
        else:
            with self._turns:
                self._waiting.insert(0 if first else len(self._waiting), name)
            self.call(name, self._real_run, name, script, args, kwargs)
        if folder:
            self.folders[name] = folder

    def start_together(self, name: str, script: str, *args, folder: Path | None = None) -> None:
        """A 2-process run of train.py or finetune.py (under torchrun) that shares one launch with the
        others given so (launch_together, once they all are): every run's processes are the launch's
        two interpreters, which run them in turn (tests/launch_runs.py), so a run costs no imports."""
        if not self.together:  # the launch's turn among the real runs: where its first run was given
            with self._turns:
                self._waiting.append(TOGETHER)
        self.together.append((name, script, args))
        if folder:
            self.folders[name] = folder

    def launch_together(self, out: Path) -> None:
        """Starts the launch of the runs given to start_together, their outputs in `out`."""
        if not self.together:
            return
        args = [out]
        for name, script, run_args in self.together:
            args += ["--", name, script, *run_args]
        self.call(TOGETHER, self._real_run, TOGETHER, "tests/launch_runs.py", args, {"processes": 2})
        self.in_launch = {name: out for name, _, _ in self.together}

    def _from_launch(self, name: str) -> subprocess.CompletedProcess:
        """One run of the shared launch, read once the launch has ended: what rank 0 then rank 1
        printed, and an exit status that fails it wherever its own 2-process run would have failed:
        the status of its first rank that failed; else, where the launch itself failed (an
        interpreter that crashed in its teardown, say: torchrun's status), the launch's, with
        torchrun's report; else 0. A run the launch never finished (it stops at a run that fails)
        has the launch's status and says so."""
        launch, out = self[TOGETHER], self.in_launch[name]
        statuses, stdout, stderr = [], "", ""
        for rank in (0, 1):
            files = {kind: out / f"{name}.rank{rank}.{kind}" for kind in ("status", "out", "err")}
            if not files["status"].exists():  # the launch ended before this run did
                return subprocess.CompletedProcess([name], launch.returncode or 1, launch.stdout,
                                                   f"{launch.stderr}\n{name}: rank {rank} left no exit status")
            statuses.append(int(files["status"].read_text()))
            stdout, stderr = stdout + files["out"].read_text(), stderr + files["err"].read_text()
        status = next((s for s in statuses if s), 0)
        if status == 0 and launch.returncode != 0:
            status, stderr = launch.returncode, f"{stderr}\nthe launch of the runs together: exit " \
                                                f"{launch.returncode}\n{launch.stderr[-3000:]}"
        return subprocess.CompletedProcess([name], status, stdout, stderr)

    def _real_run(self, name: str, script, args, kwargs) -> subprocess.CompletedProcess:
        with self._turn(name) as turn:
            return finish(start_script(script, *args, **kwargs)) if turn else None

    @contextlib.contextmanager
    def _turn(self, name: str):
        """Waits for `name`'s turn among the real runs (at_once), then holds it: gives True, or False
        when the session ends before any test asked for it (it is then not done)."""
        with self._turns:
            self._turns.wait_for(lambda: name in self._asked or self._closing or (
                self.at_once is None or self._running < self.at_once) and self._waiting[0] == name)
            self._waiting.remove(name)
            self._turns.notify_all()
            if name not in self._asked and self._closing:
                yield False  # the session ends (a test failed under -x, say) before any test asked for it
                return
            self._running += 1
        try:
            yield True
        finally:
            with self._turns:
                self._running -= 1
                self._turns.notify_all()

    def call(self, name: str, function, *args, real_runs: bool = False, niceness: int = BACKGROUND_NICENESS,
             folder: Path | None = None) -> None:
        """`function(*args)` in a thread started now; `started[name]` gives its result, or raises in
        the test that asks what it raised (pytest.skip included). With `real_runs`, the function
        starts real interpreters itself (a scenario of signals, say): it waits for its turn, and
        holds it while it runs, as one of the real runs. What it starts runs at `niceness` (0 for a
        scenario that times its processes: a lower priority would time the other work instead).
        `folder`: where it works, as start's."""
        if folder:
            self.folders[name] = folder
        if real_runs:
            with self._turns:
                self._waiting.append(name)

        def run():
            _thread.niceness = niceness  # what it starts: niced, with the session's environment
            try:
                if real_runs:
                    with self._turn(name) as turn:
                        self.outcomes[name] = (function(*args) if turn else None, None)
                else:
                    self.outcomes[name] = (function(*args), None)
            except BaseException as error:  # pytest.skip's Skipped is no Exception
                self.outcomes[name] = (None, error)
        self.threads[name] = threading.Thread(target=run, name=name, daemon=True)
        self.threads[name].start()

    def outcome(self, name: str) -> tuple[object, BaseException | None]:
        """What call(name, ...) returned and what it raised, once it has ended."""
        with self._turns:  # a real run still waiting for its turn: it is needed now
            self._asked.add(name)
            self._turns.notify_all()
        self.threads[name].join()
        return self.outcomes[name]

    def when_done(self, name: str):
        """What started[name] gives, for a thread that needs it: a real run waiting for its turn keeps it."""
        self.threads[name].join()
        result, error = self.outcomes[name]
        if error is not None:
            raise error
        return result

    def __contains__(self, name: str) -> bool:
        return name in self.threads or name in self.later or name in self.results or name in self.in_launch

    def __getitem__(self, name: str):
        """A run's CompletedProcess, or what a call returned."""
        if name in self.later:
            script, args, env = self.later.pop(name)
            self.results[name] = run_in_process(script, *args, env=env)
        if name in self.in_launch and name not in self.results:
            self.results[name] = self._from_launch(name)
        if name in self.results:
            return self.results[name]
        result, error = self.outcome(name)
        if error is not None:
            raise error
        return result

    def run(self, name: str) -> tuple[subprocess.CompletedProcess, Path]:
        """Its result and its run folder."""
        return self[name], self.folders[name]

    def at_end(self, function, *args) -> None:
        """`function(*args)` when the session ends (collect_all), before the last threads are waited for."""
        self.at_end_calls.append((function, args))

    def collect_all(self) -> None:
        """Waits for the real runs that no test asked for (a selection of the tests), leaving no
        process behind; those still waiting for their turn, and the in-process runs that none
        asked for, are not done."""
        with self._turns:
            self._closing = True
            self._turns.notify_all()
        for function, args in self.at_end_calls:
            function(*args)
        for name in list(self.threads):
            self.threads[name].join()
