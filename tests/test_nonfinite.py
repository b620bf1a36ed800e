"""A non-finite loss on one process stops every process at that step, with the same line.

    python -m pytest -q tests/test_nonfinite.py      # about a minute on 2 cores

The fault is injected here, not in fixres: run as a script,

    RANK=1 WORLD_SIZE=2 ... FIXRES_NAN_RANK=1 FIXRES_NAN_STEP=4 python tests/test_nonfinite.py --data ...

this file is train.py whose training loss (the cross-entropy that fixres.engine takes
with its default mean reduction; evaluation asks for reduction="none") is NaN on rank
$FIXRES_NAN_RANK from its $FIXRES_NAN_STEP-th training batch on (counted from 0, so the
optimizer step of that number with --grad-accum 1). The two ranks are started as two
plain processes with the variables torchrun would set, not under torchrun, which ends
the other ranks with SIGTERM once one exits: each rank's own exit status is seen.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVE_TIMEOUT = 60  # a rank left waiting fails the test in a minute rather than hanging it


def nan_from(step: int, log: str | None = None):
    """torch.nn.functional, with a training cross-entropy that is NaN from call `step` on;
    the time of the first NaN is written to `log`."""
    calls = 0

    def cross_entropy(logits, targets, *args, **kwargs):
        nonlocal calls
        loss = F.cross_entropy(logits, targets, *args, **kwargs)
        if kwargs.get("reduction", "mean") != "mean":
            return loss
        calls += 1
        if calls <= step:
            return loss
        if log and calls == step + 1:
            Path(log).write_text(repr(time.time()))
        return loss * float("nan")

    return types.SimpleNamespace(**{**vars(F), "cross_entropy": cross_entropy})


def train_args(data, out: Path, processes: int = 1) -> list[str]:
    """3 optimizer steps an epoch (60 images, 16 a step), a checkpoint after each epoch."""
    from tests.conftest import TINY_TRAIN
    return ["--data", str(data), *TINY_TRAIN, "--batch-size", str(16 // processes), "--epochs", "2", "--seed", "0",
            "--cpu", "--output", str(out), "--name", "run", "--collective-timeout", str(COLLECTIVE_TIMEOUT)]


def test_one_process_stops_at_the_step_with_its_line(tmp_path, tiny_csv, monkeypatch, capsys):
    import fixres.engine
    from fixres.cli import run_main
    from train import main

    monkeypatch.setattr(fixres.engine, "F", nan_from(4))
    assert run_main(main, train_args(tiny_csv, tmp_path)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert re.fullmatch(r"error: loss is nan at optimizer step 4 \(learning rate \S+\); lower --lr, .*; "
                        r"nothing was saved after it, the last checkpoint is \S+/epoch-0001-step-000003", errors[0])


def test_a_nan_on_one_rank_stops_both_ranks_at_that_step_with_the_same_line(tmp_path, tiny_csv):
    from tests.conftest import free_port
    torchrun_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
                    "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "FIXRES_NAN_RANK": "1", "FIXRES_NAN_STEP": "4",
                    "FIXRES_NAN_LOG": str(tmp_path / "nan.log")}
    ranks = [subprocess.Popen([sys.executable, __file__, *train_args(tiny_csv, tmp_path, processes=2)], cwd=ROOT,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, **torchrun_env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in (0, 1)]
    results = [rank.communicate(timeout=10 * COLLECTIVE_TIMEOUT) for rank in ranks]
    ended = time.time()

    lines = []
    for rank, process, (out, err) in zip((0, 1), ranks, results):
        assert process.returncode == 2, f"rank {rank}: exit {process.returncode}\n{out[-2000:]}\n{err[-3000:]}"
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"rank {rank}:\n{err[-3000:]}"
        lines.append(errors[0])
    assert lines[0] == lines[1]
    assert re.fullmatch(r"error: loss is nan on process 1 of 2 at optimizer step 4 \(learning rate \S+\); "
                        r"lower --lr, .*; nothing was saved after it, the last checkpoint is "
                        r"\S+/epoch-0001-step-000003", lines[0]), lines[0]
    # at that step, not at the next collective's timeout
    assert ended - float((tmp_path / "nan.log").read_text()) < COLLECTIVE_TIMEOUT / 2


def main() -> int:
    sys.path.insert(0, str(ROOT))
    import fixres.engine
    from fixres.cli import run_main
    from train import main as train_main

    if os.environ["RANK"] == os.environ["FIXRES_NAN_RANK"]:
        fixres.engine.F = nan_from(int(os.environ["FIXRES_NAN_STEP"]), os.environ["FIXRES_NAN_LOG"])
    return run_main(train_main, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
