"""train.py with 2 processes (torchrun, gloo on CPU) against 1 process with the same global batch.

Already held elsewhere: sweep.py prints the same table with 1 and 2 processes
(test_sweep.py); finetune.py's 2 x 5 and 1 x 10 batches give the same weights
(test_finetune.py); train.py with 2 processes counts each validation image once
(test_train.py). Here, train.py itself: 2 processes x batch 8 take the same 16 images per
step as 1 process x batch 16 (Accelerate hands whole batches to the ranks in turn, and an
image's crop depends on its index only), so a model without BatchNorm (BatchNorm normalises
by each process's own batch, and SyncBatchNorm does not run on CPUs) must print the same
numbers and end with the same weights, up to the order of floating-point sums.
"""
import json
import re

import pytest
import torch

from fixres.fileio import load_weights
from tests.conftest import run_in_process

NO_BN = ["--model", "test_convnext", "--train-res", "32", "--workers", "0", "--epochs", "2", "--cpu"]  # LayerNorm


def epoch_lines(stdout: str) -> list[str]:
    """The numbers a user reads each epoch, without the speed and time columns."""
    return [line.split("| lr")[0] for line in stdout.splitlines() if line.startswith("epoch ")]


TWO = "test_processes.py: train.py with 2 processes"


def start_early(started, fixtures: set[str], tmp_path_factory, tiny_csv) -> None:
    """conftest's early_runs calls this as the session starts: the test's 2-process run (under
    torchrun, in the session's one launch of such runs: start_together) trains in the background, beside the test files before this one."""
    if "two_processes" in fixtures:
        out = tmp_path_factory.mktemp("processes")
        started.start_together(TWO, "train.py", "--data", tiny_csv, *NO_BN, "--output", out, "--batch-size", "8",
                               "--name", "two", folder=out)


@pytest.fixture
def two_processes(early_runs) -> tuple:
    """(early_runs, the output folder of start_early's run): the run is collected when the test asks."""
    return early_runs, early_runs.folders[TWO]


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(two_processes, tiny_csv):
    started, out = two_processes
    results = {"one": run_in_process("train.py", "--data", tiny_csv, *NO_BN, "--output", out, "--batch-size", "16",
                                     "--name", "one"),
               "two": started[TWO]}
    stdout = {}
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
        stdout[name] = result.stdout
    assert re.search(r"processes\s+2\b", stdout["two"]) and re.search(r"processes\s+1\b", stdout["one"])
    assert len(epoch_lines(stdout["one"])) == 2
    assert epoch_lines(stdout["two"]) == epoch_lines(stdout["one"])

    records = {name: [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
               for name in stdout}
    for a, b in zip(records["one"], records["two"], strict=True):
        assert (a["val_acc"], a["val_count"], a["train_images"]) == (b["val_acc"], b["val_count"], b["train_images"])
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-5 and abs(a["train_loss"] - b["train_loss"]) < 1e-5

    one, _ = load_weights(out / "one" / "last.safetensors")
    two, _ = load_weights(out / "two" / "last.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-5)
