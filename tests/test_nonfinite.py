"""A non-finite loss on one process stops every process at that step, with the same line.

    python -m pytest -q tests/test_nonfinite.py      # 1-2 minutes on 2 cores

The fault is injected here, not in fixres: run as a script,

    FIXRES_NAN_RANK=1 FIXRES_NAN_STEP=4 FIXRES_NAN_LOG=nan.log torchrun --nproc_per_node 2 tests/test_nonfinite.py ...

this file is train.py whose training loss (the cross-entropy that fixres.engine takes
with its default mean reduction; evaluation asks for reduction="none") is NaN on rank
$FIXRES_NAN_RANK from its $FIXRES_NAN_STEP-th training batch on, counted from 0: the
optimizer step of that number with --grad-accum 1. The time of the first NaN goes to
$FIXRES_NAN_LOG. The other ranks linger 3 s after their error line, as a slow teardown of
torch would: torchrun's SIGTERM, sent when the first rank exits, reaches them then.
"""
from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVE_TIMEOUT = 60  # a rank left waiting fails the test in a minute rather than hanging it
NAN_STEP = 4  # the second step of epoch 2: one checkpoint written before it

pytestmark = pytest.mark.slow


def nan_from(step: int, log: str | None = None):
    """torch.nn.functional, with a training cross-entropy that is NaN from call `step` on."""
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


def expected_line(processes: int, out: Path) -> str:
    where = "" if processes == 1 else " on process 1 of 2"
    return (rf"error: loss is nan{where} at optimizer step {NAN_STEP} \(learning rate \S+\); lower --lr, .*; "
            rf"nothing was saved after it, the last checkpoint is {re.escape(str(out))}/run/checkpoints/"
            rf"epoch-0001-step-000003")


def test_one_process_stops_at_the_step_with_its_line(tmp_path, tiny_csv, monkeypatch, capsys):
    import fixres.engine
    from fixres.cli import run_main
    from train import main

    monkeypatch.setattr(fixres.engine, "F", nan_from(NAN_STEP))
    assert run_main(main, train_args(tiny_csv, tmp_path)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert re.fullmatch(expected_line(1, tmp_path), errors[0]), errors[0]


def launch(launcher: str, data, out: Path) -> list[subprocess.Popen]:
    """Two ranks with the NaN on rank 1: as two plain processes with the variables torchrun
    sets (each one's exit status is its own), or under torchrun (which ends the other ranks
    with SIGTERM as soon as one exits)."""
    from tests.conftest import free_port, start_script  # here: this file also runs as a script
    env = {"FIXRES_NAN_RANK": "1", "FIXRES_NAN_STEP": str(NAN_STEP), "FIXRES_NAN_LOG": str(out / "nan.log")}
    args = train_args(data, out, processes=2)
    port = free_port()
    if launcher == "torchrun":
        return [start_script(Path(__file__), *args, processes=2, port=port, env=env)]
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    return [start_script(Path(__file__), *args, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
            for rank in (0, 1)]


def nan_on_rank_one(data, root: Path) -> tuple[dict, dict]:
    """Both launches (launch) at once, waited for: each one's processes with their output, and the
    seconds from the first NaN to the end of them all."""
    outs = {launcher: root / launcher for launcher in ("plain", "torchrun")}
    started = {launcher: launch(launcher, data, out) for launcher, out in outs.items()}  # at once: 2 slow cores
    results = {launcher: [(p, *p.communicate(timeout=10 * COLLECTIVE_TIMEOUT)) for p in processes]
               for launcher, processes in started.items()}
    ended = time.time()
    return results, {launcher: ended - float((out / "nan.log").read_text()) for launcher, out in outs.items()}


def start_early(started, fixtures: set[str], tmp_path_factory, tiny_csv) -> None:
    """conftest's early_runs calls this as the session starts: nan_on_rank_one's six processes, in a
    thread that waits for its turn among the real runs, beside the test files before this one."""
    if "nan_on_rank_one_runs" in fixtures:
        root = tmp_path_factory.mktemp("nan_on_rank_one")
        started.call("nan_on_rank_one", nan_on_rank_one, tiny_csv, root, real_runs=True, niceness=0,  # timed
                     folder=root)


@pytest.fixture
def nan_on_rank_one_runs(early_runs) -> tuple[dict, dict, Path]:
    """start_early's nan_on_rank_one: its results, its seconds, and its folder."""
    return *early_runs["nan_on_rank_one"], early_runs.folders["nan_on_rank_one"]


def test_a_nan_on_one_rank_stops_both_ranks_at_that_step_with_the_same_line(nan_on_rank_one_runs):
    results, seconds, root = nan_on_rank_one_runs
    outs = {launcher: root / launcher for launcher in ("plain", "torchrun")}
    for launcher in outs:  # at that step, not at the next collective's timeout
        assert seconds[launcher] < COLLECTIVE_TIMEOUT / 2, launcher

    lines = []
    for rank, (process, stdout, stderr) in enumerate(results["plain"]):
        assert process.returncode == 2, f"rank {rank}: exit {process.returncode}\n{stdout[-2000:]}\n{stderr[-3000:]}"
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"rank {rank}:\n{stderr[-3000:]}"
        lines += errors
    assert lines[0] == lines[1]
    assert re.fullmatch(expected_line(2, outs["plain"]), lines[0]), lines[0]

    (_, stdout, stderr), = results["torchrun"]  # both ranks' stderr, then torchrun's report of their exits
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[0] == errors[1], stderr[-4000:]
    assert re.fullmatch(expected_line(2, outs["torchrun"]), errors[0]), errors[0]
    assert re.findall(r"^\s*exitcode\s+: (-?\d+)", stderr, re.MULTILINE) == ["2", "2"], stderr[-3000:]  # not -15


@pytest.mark.parametrize("processes", ["1", "2"])
def test_the_error_line_is_one_write(monkeypatch, processes):
    """Under torchrun the ranks share one stderr, and they print the same error at the same
    moment: a line written in two parts (print writes its newline apart) was split by the other
    rank's, once in a suite run."""
    from fixres.cli import run_main
    from fixres.engine import NonFiniteLossError

    writes = []
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(write=writes.append, flush=lambda: None))
    monkeypatch.setenv("WORLD_SIZE", processes)
    monkeypatch.setattr("signal.signal", lambda *args: None)  # what a rank of two would ignore: not this test's

    def fails(argv):
        raise NonFiniteLossError("loss is nan at optimizer step 4")
    assert run_main(fails, []) == 2
    assert writes == ["error: loss is nan at optimizer step 4\n"]


def main() -> int:
    gc.disable()  # for the imports below, as train.py does for its own; run_main turns it back on
    sys.path.insert(0, str(ROOT))
    import fixres.engine
    from fixres.cli import run_main
    from train import main as train_main

    if os.environ["RANK"] == os.environ["FIXRES_NAN_RANK"]:
        fixres.engine.F = nan_from(int(os.environ["FIXRES_NAN_STEP"]), os.environ["FIXRES_NAN_LOG"])
    status = run_main(train_main, sys.argv[1:])
    if os.environ["RANK"] != os.environ["FIXRES_NAN_RANK"]:
        time.sleep(3)  # a slow teardown, always: torchrun's SIGTERM finds this rank still ending
    return status


if __name__ == "__main__":
    sys.exit(main())
