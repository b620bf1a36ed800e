"""Shared fixtures: tiny datasets written to disk, and running the scripts as a user would."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixres.layers import layered, parse_command_line
# how the scripts run, in this process or as real interpreters; the test files import these from here
from tests.script_runs import (ROOT, Started, environ, finish, free_port, niced, run_file_in_process,  # noqa: F401
                               run_in_process, run_script, script_command, script_main, start_script)

COLOURS = ("red", "green", "blue")

# The test process computes on one thread, as every run does (OMP_NUM_THREADS=1): on the 2-core test
# machine its in-process runs take one core and the real runs in the background the other, and no
# OpenMP thread spins waiting for a core that another process holds.
torch.set_num_threads(1)


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


def pytest_collection_modifyitems(items):
    """Tests marked `late` (they read a run that the session starts in the background on its way,
    once what the run needs is there) after all the others, in their order: meanwhile the run uses
    a core that this process leaves idle. A fixture that such a test shares with the tests of its
    file before it is session-scoped, not made a second time."""
    items.sort(key=lambda item: item.get_closest_marker("late") is not None)  # stable


@pytest.fixture(scope="session")
def early_runs(request, tiny_csv, tmp_path_factory):
    """Runs that several test files read, started as the session starts when a selected test
    needs them, so that they train beside the quick tests before them; a test module can start
    its own the same way (test_slurm.py's start_early: the SLURM jobs)."""
    started = Started(at_once=2)  # beside this process's own work: the 2 cores are busy, memory is not filled
    fixtures = {name for item in request.session.items for name in item.fixturenames}
    if "trained_run" in fixtures:
        out = tmp_path_factory.mktemp("trained")
        started.start("trained_run", "train.py", "--data", tiny_csv, *TINY_TRAIN, "--epochs", "2", "--output", out,
                      "--name", "run", folder=out / "run")
    # a test module's own work, started by its start_early(started, fixtures, tmp_path_factory, tiny_csv), in
    # the order of the modules: the runs wait for their turn in that order, or start when a test asks for them
    for module in dict.fromkeys(getattr(item, "module", None) for item in request.session.items):
        if hasattr(module, "start_early"):
            module.start_early(started, fixtures, tmp_path_factory, tiny_csv)
    started.launch_together(tmp_path_factory.mktemp("together"))  # the 2-process runs they gave start_together
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
