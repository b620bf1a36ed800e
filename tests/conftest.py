"""Shared fixtures: tiny datasets written to disk, and running the scripts as a user would."""
from __future__ import annotations

import functools
import importlib.util
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixres.cli import run_main
from fixres.layers import layered, parse_command_line
from tests.script_server import shared_server

ROOT = Path(__file__).resolve().parents[1]
COLOURS = ("red", "green", "blue")


def write_colour_image(path: Path, label: int, rng, size=(48, 40)) -> None:
    """Noise with one dominant channel: learnable in one epoch by a tiny model."""
    pixels = (rng.random((size[1], size[0], 3)) * 90).astype("uint8")
    pixels[..., label] += 140
    Image.fromarray(pixels).save(path, quality=90)


def make_csv_dataset(root: Path, n_train: int = 60, n_val: int = 25, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["image_id,label,is_val"]
    for i in range(n_train + n_val):
        label = i % len(COLOURS)
        write_colour_image(root / "images" / f"{i:04d}.jpg", label, rng)
        rows.append(f"{i:04d}.jpg,{COLOURS[label]},{i >= n_train}")
    csv = root / "labels.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def make_image_folder(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(1)
    for part, n in (("train", per_class), ("val", 2)):
        for label, name in enumerate(COLOURS):
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                write_colour_image(root / part / name / f"{i}.jpg", label, rng)
    return root


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    """60 training and 25 validation images (25: not a multiple of any batch or process count)."""
    return make_csv_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("folder"))


# The smallest training run that still exercises everything: timm's 0.4M-parameter ResNet.
TINY_TRAIN = ["--model", "test_resnet", "--train-res", "32", "--batch-size", "16", "--workers", "0"]


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


# Runs are forked from tests/script_server.py, which has imported torch, torchvision, timm and
# accelerate once (3.5 s of CPU a run here); FIXRES_TEST_FRESH_INTERPRETERS=1 starts each in a new one.
FRESH_INTERPRETERS = os.environ.get("FIXRES_TEST_FRESH_INTERPRETERS") == "1"


def start_script(script, *args, processes: int = 1, port: int | None = None, env=None, fresh: bool = False,
                 **popen) -> subprocess.Popen:
    """Start a script in the background as a user would (one thread a process); finish() collects it.
    A process of its own, forked from the script server unless `fresh` or a preexec_fn asks for
    a new interpreter (torchrun's workers always are)."""
    command = script_command(script, processes, port) + [str(a) for a in args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    assert popen.keys() <= {"preexec_fn", "start_new_session"}, popen.keys()  # what both ways can do
    if fresh or FRESH_INTERPRETERS or popen.get("preexec_fn"):
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                                **popen)
    return shared_server().popen(command, env=env, cwd=ROOT, start_new_session=popen.get("start_new_session", False))


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
    """Run a top-level script as a user would: `python script ...`, or under torchrun."""
    return finish(start_script(script, *args, processes=processes, env=env), timeout)


@functools.cache
def script_main(script: str):
    """The `main(argv)` of a top-level script (train.py, sweep.py, finetune.py), imported by path."""
    spec = importlib.util.spec_from_file_location(f"{Path(script).stem}_script", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_in_process(script: str, *args, capsys) -> subprocess.CompletedProcess:
    """What `run_script` gives, without a new interpreter, for runs that stop at an error:
    run_main's exit status (argparse's own for options it refuses) and the captured output."""
    capsys.readouterr()  # only this run's output
    try:
        status = run_main(script_main(script), [str(a) for a in args])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([script, *map(str, args)], status, out, err)


def parsed(cls, argv, preset=None):
    """(config, options given): argv through a script's parser (`preset`: train.py's), stacked
    as its job stacks them before the source or resumed run is read."""
    given = parse_command_line(cls, [str(a) for a in argv], "test", preset=preset)
    return layered(cls, given, preset=preset(given) if preset else None), given


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line a script prints on bad input."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:") or ": error:" in line]
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


class Started:
    """Script runs started together in the background, each collected when a test first asks
    for it (`started[name]`): the scripts run one thread each, so on a machine of few cores
    runs side by side use the cores that one run at a time leaves idle. Waits that need no
    core of this process (jobs of another program, a daemon starting) run in a thread (call)."""

    def __init__(self):
        self.processes: dict[str, subprocess.Popen] = {}
        self.results: dict[str, subprocess.CompletedProcess] = {}
        self.folders: dict[str, Path] = {}  # the run folder of each, where one was given
        self.threads: dict[str, threading.Thread] = {}
        self.outcomes: dict[str, tuple[object, BaseException | None]] = {}  # (result, what it raised)
        self.at_end_calls: list = []

    def start(self, name: str, script, *args, folder: Path | None = None, **kwargs) -> None:
        self.processes[name] = start_script(script, *args, **kwargs)
        if folder:
            self.folders[name] = folder

    def call(self, name: str, function, *args) -> None:
        """`function(*args)` in a thread started now; `started[name]` gives its result, or raises in
        the test that asks what it raised (pytest.skip included)."""
        def run():
            try:
                self.outcomes[name] = (function(*args), None)
            except BaseException as error:  # pytest.skip's Skipped is no Exception
                self.outcomes[name] = (None, error)
        self.threads[name] = threading.Thread(target=run, name=name, daemon=True)
        self.threads[name].start()

    def outcome(self, name: str) -> tuple[object, BaseException | None]:
        """What call(name, ...) returned and what it raised, once it has ended."""
        self.threads[name].join()
        return self.outcomes[name]

    def __contains__(self, name: str) -> bool:
        return name in self.processes or name in self.threads

    def __getitem__(self, name: str):
        """A run's CompletedProcess, or what a call returned."""
        if name in self.threads:
            result, error = self.outcome(name)
            if error is not None:
                raise error
            return result
        if name not in self.results:
            self.results[name] = finish(self.processes[name])
        return self.results[name]

    def run(self, name: str) -> tuple[subprocess.CompletedProcess, Path]:
        """Its result and its run folder."""
        return self[name], self.folders[name]

    def at_end(self, function, *args) -> None:
        """`function(*args)` when the session ends (collect_all), before the last threads are waited for."""
        self.at_end_calls.append((function, args))

    def collect_all(self) -> None:
        """Waits for the runs that no test asked for (a selection of the tests), leaving no process behind."""
        for name in self.processes:
            self[name]
        for function, args in self.at_end_calls:
            function(*args)
        for thread in list(self.threads.values()):
            thread.join()


@pytest.fixture(scope="session")
def early_runs(request, tiny_csv, tmp_path_factory):
    """Runs that several test files read, started as the session starts when a selected test
    needs them, so that they train beside the quick tests before them; a test module can start
    its own the same way (test_slurm.py's start_early: the SLURM jobs)."""
    started = Started()
    fixtures = {name for item in request.session.items for name in item.fixturenames}
    if "trained_run" in fixtures:
        out = tmp_path_factory.mktemp("trained")
        # in a new interpreter, as every run was before the script server: one whole run still
        # imports everything the way `python train.py` does
        started.start("trained_run", "train.py", "--data", tiny_csv, *TINY_TRAIN, "--epochs", "2", "--output", out,
                      "--name", "run", folder=out / "run", fresh=True)
    # a test module's own shared work, started by its start_early(started, fixtures, tmp_path_factory)
    for module in dict.fromkeys(getattr(item, "module", None) for item in request.session.items):
        if hasattr(module, "start_early"):
            module.start_early(started, fixtures, tmp_path_factory)
    yield started
    started.collect_all()


@pytest.fixture(autouse=True)
def _start_early_runs(early_runs):
    """Every test asks for early_runs, so that the first one starts them."""


@pytest.fixture(scope="session")
def trained_run(early_runs) -> tuple[subprocess.CompletedProcess, Path]:
    """`train.py --epochs 2` of the tiny model on tiny_csv, run once for every test that reads
    such a run; a test that writes into it works on a copy (shutil.copytree)."""
    return early_runs.run("trained_run")
