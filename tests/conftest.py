"""Shared fixtures: tiny datasets written to disk, and running the scripts as a user would."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


def run_script(script: str, *args, processes: int = 1, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    """Run a top-level script as a user would: `python script ...`, or under torchrun."""
    if processes == 1:
        cmd = [sys.executable, str(ROOT / script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master_port={free_port()}", str(ROOT / script)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=full_env)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line a script prints on bad input."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:") or ": error:" in line]
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]
