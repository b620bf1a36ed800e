"""Faults survived, bad input refused, nothing lost, nothing unsafe loaded.

The real train.py, killed or signalled at named moments (tests/kill_harness.py), its
ranks killed or frozen under torchrun, its disk filled or made read-only, its
checkpoints truncated or replaced by a malicious pickle. Bad inputs that the data,
checkpoint and model tests already cover are not repeated here; tests/reliability_table.py
runs those and these together and writes docs/reliability.md from what they record.

    python -m pytest -q tests/test_reliability.py     # about 4 minutes on 2 cores
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from fixres import checkpoint as ckpt
from fixres import fileio
from fixres import cli
from fixres.cli import run_main
from fixres.config import TrainConfig
from fixres.images import BadImageError, open_image
from fixres.layers import parse_command_line
from tests import kill_harness as harness
from tests.conftest import TINY_TRAIN, Started, error_line, finish, free_port, run_in_process, script_main

# 60 training images in batches of 16: 3 optimizer steps an epoch, a checkpoint after each
# epoch, and from the third on one pruned (two are kept)
EPOCHS = 3
KILL_SEED = 7


def train_args(data, out: Path, *extra) -> list:
    return ["--data", data, *TINY_TRAIN, "--epochs", EPOCHS, "--seed", 0, "--output", out, "--name", "run", *extra]


def record(section: str, case: str, outcome: str, **details) -> None:
    """One row of docs/reliability.md, when tests/reliability_table.py asks for them."""
    log = os.environ.get("FIXRES_RELIABILITY_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"section": section, "case": case, "outcome": outcome, **details}) + "\n")


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def weights(path: Path) -> dict:
    return fileio.load_weights(path)[0]


def assert_same_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs between {a} and {b}"


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def epoch_of(checkpoint: Path) -> int:
    return int(re.match(r"epoch-(\d+)", checkpoint.name).group(1))


def check_run_folder(run: Path) -> int:
    """Load everything a resume or a user reads; the epoch of the newest checkpoint (0: none)."""
    for checkpoint in ckpt.RunFolder(run).checkpoints():
        state_dict, meta = fileio.load_weights(checkpoint / ckpt.WEIGHTS_FILE)
        assert all(torch.isfinite(t).all() for t in state_dict.values() if t.is_floating_point()), checkpoint
        saved = ckpt.RunFolder.read_training_state(checkpoint)
        epoch, step = map(int, re.match(r"epoch-(\d+)-step-(\d+)", checkpoint.name).groups())
        assert (saved["run"]["epoch"], saved["run"]["step"]) == (epoch, step), checkpoint
        assert meta.get("epoch", epoch) == epoch
    for name in ("last.safetensors", "best.safetensors"):
        if (run / name).exists():
            fileio.load_weights(run / name)
    for name in ("config.json", "classes.json"):
        if (run / name).exists():
            json.loads((run / name).read_text())
    if (run / "metrics.jsonl").exists():
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    found = ckpt.RunFolder(run).checkpoints()
    return epoch_of(found[-1]) if found else 0


def temporaries(run: Path) -> list[str]:
    return [str(p.relative_to(run)) for p in run.rglob("*") if p.name.endswith(".tmp")]


def metrics(run: Path) -> list[dict]:
    drop = ("images_per_s", "seconds", "val_seconds", "data_wait_frac")  # timings
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


REFERENCE = "test_reliability.py: the uninterrupted run"


def start_early(started, fixtures: set[str], tmp_path_factory, tiny_csv) -> None:
    """conftest's early_runs calls this as the session starts: the uninterrupted run (tests/kill_harness.py,
    recording its events) trains in the background, beside the test files before this one, and
    the chain of kills after it (kill_ten_times) in a thread."""
    if "reference" in fixtures:
        root = tmp_path_factory.mktemp("reference")
        # first: the ten kills follow it, one after the other (the longest chain of the session's runs)
        started.start(REFERENCE, harness.__file__, *train_args(tiny_csv, root), folder=root, first=True,
                      **harness.start_options(events=root / "events.jsonl"))
    if "ten_sigkills" in fixtures:
        root = tmp_path_factory.mktemp("sigkills")
        # the session's longest chain of runs: before the other background runs (a lower niceness), after
        # the test process's own work
        started.call(SIGKILLS, kill_ten_times, started, tiny_csv, root, niceness=5, folder=root)
    # the scenarios of signals and of a rank that dies or hangs: real processes, each in a thread that
    # waits for its turn among the real runs; the tests read what happened and do the in-process rest
    for fixture, scenario in SCENARIOS.items():
        if fixture in fixtures:
            root = tmp_path_factory.mktemp(fixture)
            timed = {"niceness": 0} if fixture in ("killed_rank", "hung_rank") else {}  # priority not lowered
            started.call(fixture, scenario, tiny_csv, root, real_runs=True, folder=root, **timed)


@pytest.fixture(scope="session")  # the late test of the kills reads it after the other files' tests
def reference(early_runs):
    """The uninterrupted run every interrupted one must equal, and its events: the moments to kill at."""
    result, root = early_runs.run(REFERENCE)
    assert_ok(result)
    return {"run": root / "run", "events": harness.read_events(root / "events.jsonl")}


# ----------------------------------------------------------------------------- SIGKILL at any moment

def started_paused(args, events: Path, point: str, meanwhile=None, **kwargs) -> tuple[subprocess.Popen, dict]:
    """A harness process (or torchrun and its workers) stopped at `point`; killed if it never gets there.
    `meanwhile()`: work of this process done while that one starts (its imports: seconds of a core)."""
    process = harness.start(args, events=events, pause_at=point, **kwargs)
    try:
        if meanwhile:
            meanwhile()
        return process, harness.wait_for(events, "paused", process, timeout=240,
                                         rank=str(kwargs["pause_rank"]) if "pause_rank" in kwargs else None)
    except BaseException:
        kill_all(process)
        raise


def kill_all(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)  # the harness starts each run in a session of its own
        process.communicate()


def reachable(points: list[str], keys: list[str]) -> bool:
    """Whether each point is reached by the run resumed after a kill at the point before it.
    A resumed run starts after its newest checkpoint: the writes that followed that
    checkpoint's rename in the killed run (last.safetensors, pruning, ...) are not redone
    as such (resume rewrites last/best from the checkpoint when they are behind it)."""
    at = {k: i for i, k in enumerate(keys)}
    saves = []  # (position of a checkpoint's rename, position of the next training or evaluation batch)
    for i, k in enumerate(keys):
        if re.fullmatch(r"renamed checkpoints/epoch-\d+-step-\d+", k):
            after = [j for j in range(i + 1, len(keys)) if keys[j].startswith(("train ", "eval "))]
            saves.append((i, after[0] if after else len(keys)))
    for previous, point in zip(points, points[1:]):
        if any(renamed <= at[previous] and renamed < at[point] < end for renamed, end in saves):
            return False
    return True


def kill_points(events: list[dict], rng: random.Random) -> list[tuple[str, str]]:
    """10 moments of the reference run, drawn at random within each kind: 3 training
    steps, 2 evaluations, 1 start-up write and 4 moments of the saves after an epoch
    (a checkpoint folder half built; complete but not renamed; renamed with the
    files derived from it, or the pruning of the oldest, still to do; those files
    being written). (kind, event), in the order the run reaches them; drawn again
    while one of them could not be reached after the kill before it."""
    keys = [e["key"] for e in events if e["kind"] not in ("start", "paused")]
    kinds = {
        "inside an epoch": [k for k in keys if k.startswith("train step")],
        "during evaluation": [k for k in keys if k.startswith("eval ")],
        "start-up write": [k for k in keys if k.endswith(" at start")],
        "checkpoint folder half written": [k for k in keys if re.fullmatch(
            r"(write|renamed) checkpoints/[^/]+/model\.safetensors|write checkpoints/[^/]+/state\.pt", k)],
        "checkpoint complete, not yet renamed": [k for k in keys if re.fullmatch(
            r"renamed checkpoints/[^/]+/state\.pt", k)],
        "checkpoint renamed, older not yet pruned": [k for k in keys if re.fullmatch(
            r"renamed checkpoints/epoch-\d+-step-\d+( \(hidden for pruning\))?", k)],
        "last/best/metrics being written": [k for k in keys if re.fullmatch(
            r"(write|renamed) (last\.safetensors|best\.safetensors|metrics\.jsonl) after step \d+", k)],
    }
    counts = {"inside an epoch": 3, "during evaluation": 2, "start-up write": 1}
    for _ in range(1000):
        points = sorted(((kind, key) for kind, candidates in kinds.items()
                         for key in rng.sample(candidates, counts.get(kind, 1))), key=lambda p: keys.index(p[1]))
        if reachable([key for _, key in points], keys):
            return points
    raise AssertionError("no reachable set of kill points")


SIGKILLS = "test_reliability.py: ten SIGKILLs"


def kill_ten_times(started, tiny_csv, tmp_path: Path) -> tuple[list, list]:
    """The chain of ten kills, in a thread that start_early starts with the session (each kill a new
    interpreter: seconds of a core this process leaves idle), once the reference run has ended: a
    run resumed and SIGKILLed at each of ten moments of the reference run in turn, checked after
    each; its assertions fail the test that asks for it. (the moments, what survived each kill)"""
    result, root = started.when_done(REFERENCE), started.folders[REFERENCE]
    assert_ok(result)
    points = kill_points(harness.read_events(root / "events.jsonl"), random.Random(KILL_SEED))
    assert len(points) == 10
    out = tmp_path / "runs"
    run = out / "run"
    args = train_args(tiny_csv, out, "--resume", "auto")
    finished = 0  # epochs whose checkpoint folder has been renamed into place, by any process so far
    survived = []
    for i, (kind, point) in enumerate(points):
        events = tmp_path / f"events-{i}.jsonl"
        process, _ = started_paused(args, events, point)
        process.send_signal(signal.SIGKILL)  # the training process itself
        finish(process)
        assert process.returncode == -signal.SIGKILL
        for e in harness.read_events(events):
            if m := re.fullmatch(r"renamed checkpoints/epoch-(\d+)-step-\d+", e["key"]):
                finished = max(finished, int(m.group(1)))
        newest = check_run_folder(run)  # every checkpoint on disk loads, weights and state
        assert newest >= finished, f"kill {i + 1} at {point!r}: epoch {finished} was saved, newest is {newest}"
        survived.append({"kill": i + 1, "kind": kind, "moment": point, "newest_checkpoint_epoch": newest,
                         "finished_epochs": finished,
                         "temporaries_left": len(temporaries(run)) if run.exists() else 0})
    return points, survived


@pytest.fixture(scope="session")
def ten_sigkills(early_runs) -> tuple[list, list, Path]:
    """kill_ten_times' moments and survivals, and the folder its runs wrote into."""
    return *early_runs[SIGKILLS], early_runs.folders[SIGKILLS]


@pytest.mark.slow
@pytest.mark.late  # the chain of kills, one interpreter after another, takes most of the session beside it
def test_ten_sigkills_then_resume_auto_equal_an_uninterrupted_run(reference, faults, ten_sigkills, tiny_csv):
    points, survived, tmp_path = ten_sigkills  # the kills, in their thread: resumed here to the end
    out = tmp_path / "runs"
    run = out / "run"
    args = train_args(tiny_csv, out, "--resume", "auto")
    final = assert_ok(run_in_process("train.py", *args))  # to the end: no event to wait for
    for name in ("last.safetensors", "best.safetensors"):
        assert_same_weights(reference["run"] / name, run / name)
    assert metrics(run) == metrics(reference["run"])
    assert epoch_of(ckpt.RunFolder(run).checkpoints()[-1]) == EPOCHS
    assert temporaries(run) == []  # what the kills left was cleaned up on resume
    line = f"{len(survived)} of {len(points)} kills survived"
    print(line)
    for row in survived:
        record("kills", f"kill {row['kill']}: {row['kind']}", "survived", **row)
    record("kills", "summary", line, seed=KILL_SEED, resumed_runs=len(points),
           final_resume=final.stdout.count("resumed from"))


# ----------------------------------------------------------------------------- graceful stop

def stop_twice(tiny_csv, tmp_path: Path) -> list[tuple]:
    """SIGTERM, then SIGINT, each at an optimizer step of a run resumed from the last stop, checked
    after each: (signal, point, checkpoint, where, the stopped run's result) a stop."""
    args = train_args(tiny_csv, tmp_path / "runs", "--resume", "auto")
    run = tmp_path / "runs" / "run"
    # the signal arrives while optimizer step 4 (epoch 2, batch 2 of 3) is about to run;
    # the run finishes that step, saves and stops, and the next one starts from there
    stops = [("SIGTERM", "train step 4", "epoch-0001-step-000005", "epoch 2, batch 2"),
             ("SIGINT", "train step 7", "epoch-0002-step-000008", "epoch 3, batch 2")]
    previous, done = None, []
    for i, (name, point, checkpoint, where) in enumerate(stops):
        events = tmp_path / f"events-{i}.jsonl"
        process, _ = started_paused(args, events, point)
        process.send_signal(getattr(signal, name))
        result = finish(process)
        assert result.returncode == getattr(cli, "STOPPED_EXIT", 0), result.stderr[-3000:]
        assert f"stopped by {name}: checkpoint saved at {where}; continue with --resume {run}" in result.stdout
        if previous:
            assert f"resumed from {run / 'checkpoints' / previous[0]} at {previous[1]}" in result.stdout
        assert ckpt.RunFolder(run).checkpoints()[-1].name == checkpoint
        check_run_folder(run)
        done.append((name, point, checkpoint, where, result))
        previous = (checkpoint, where)
    return done


@pytest.fixture(scope="module")
def sigterm_and_sigint(early_runs):
    """stop_twice's stops (started with the session, in a thread) and the folder it ran in."""
    return early_runs["sigterm_and_sigint"], early_runs.folders["sigterm_and_sigint"]


@pytest.mark.slow
@pytest.mark.late  # its stops run in the background: read after the other tests
def test_sigterm_and_sigint_stop_at_the_next_step_and_resume_from_it(reference, tiny_csv, sigterm_and_sigint):
    stops, tmp_path = sigterm_and_sigint  # stopped twice in their thread: resumed here to the end
    run = tmp_path / "runs" / "run"
    for name, point, checkpoint, where, result in stops:
        record("graceful stop", f"{name} before optimizer step {point.split()[-1]}",
               f"exit {result.returncode}, checkpoint {checkpoint}; resumed at {where}",
               message=next(line for line in result.stdout.splitlines() if line.startswith("stopped by")))
    args = train_args(tiny_csv, tmp_path / "runs", "--resume", "auto")
    final = assert_ok(run_in_process("train.py", *args))  # to the end: no event to wait for
    _, _, checkpoint, where, _ = stops[-1]
    assert f"resumed from {run / 'checkpoints' / checkpoint} at {where}" in final.stdout
    assert_same_weights(reference["run"] / "last.safetensors", run / "last.safetensors")
    ours, theirs = metrics(run), metrics(reference["run"])
    assert [r["val_acc"] for r in ours] == [r["val_acc"] for r in theirs]
    assert [r["val_loss"] for r in ours] == [r["val_loss"] for r in theirs]
    record("graceful stop", "resumed to the end", "final weights equal the uninterrupted run's")


def skipping_args(data: Path, out: Path, *extra) -> list:
    return ["--data", data / "labels.csv", *TINY_TRAIN, "--epochs", 2, "--seed", 0, "--output", out,
            "--name", "run", "--skip-bad-images", *extra]


def stop_with_skipped_images(tiny_csv, tmp_path: Path) -> subprocess.CompletedProcess:
    """A copy of the data with half its training images broken (every batch of 16 skips some), and
    a run of it stopped by SIGTERM at optimizer step 4 (epoch 2's second batch: it runs, then the
    run stops): the stopped run's result."""
    data = shutil.copytree(tiny_csv.parent, tmp_path / "data")
    for i in range(0, 60, 2):
        (data / "images" / f"{i:04d}.jpg").write_bytes(b"not a jpeg")
    process, _ = started_paused(skipping_args(data, tmp_path / "runs", "--resume", "auto"), tmp_path / "events.jsonl",
                                "train step 4")
    process.send_signal(signal.SIGTERM)
    return finish(process)


@pytest.fixture(scope="module")
def stopped_with_skipped_images(early_runs):
    """stop_with_skipped_images' result (started with the session, in a thread) and its folder."""
    return early_runs["stopped_with_skipped_images"], early_runs.folders["stopped_with_skipped_images"]


@pytest.mark.slow
@pytest.mark.late  # its stop runs in the background: read after the other tests
def test_a_stop_mid_epoch_with_skipped_images_resumes_after_the_batches_done(stopped_with_skipped_images):
    """--skip-bad-images: a batch holds fewer images than --batch-size, so the position in the
    epoch is counted in batches, not images; the resumed run then equals an uninterrupted one."""
    stopped, tmp_path = stopped_with_skipped_images  # stopped in its thread; resumed here
    data, run = tmp_path / "data", tmp_path / "runs" / "run"
    assert f"checkpoint saved at epoch 2, batch 2; continue with --resume {run}" in stopped.stdout, stopped.stdout[-2000:]
    resumed = assert_ok(run_in_process("train.py", *skipping_args(data, tmp_path / "runs", "--resume", "auto")))
    assert f"resumed from {run / 'checkpoints' / 'epoch-0001-step-000005'} at epoch 2, batch 2" in resumed.stdout
    assert_ok(run_in_process("train.py", *skipping_args(data, tmp_path / "whole")))  # the uninterrupted run
    assert_same_weights(tmp_path / "whole" / "run" / "last.safetensors", run / "last.safetensors")
    ours, theirs = metrics(run), metrics(tmp_path / "whole" / "run")
    assert [(r["val_acc"], r["val_loss"]) for r in ours] == [(r["val_acc"], r["val_loss"]) for r in theirs]


# ----------------------------------------------------------------------------- a rank dies or hangs

def two_ranks(data, out: Path, *extra) -> list:
    # 60 images in global batches of 2 x 8: 3 optimizer steps an epoch on each rank
    return ["--data", data, "--model", "test_resnet", "--train-res", 32, "--batch-size", 8, "--workers", 0,
            "--epochs", 2, "--cpu", "--output", out, "--name", "run", *extra]


def rank0_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: process 0 of 2")]
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-4000:]
    return lines[0]


def kill_a_rank(tiny_csv, tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Two ranks, rank 1 SIGKILLed at optimizer step 1 while rank 0 waits for it in a collective (the
    default --collective-timeout, 600 s: what ends rank 0 is the lost connection): torchrun's
    result, and the seconds from the kill to its end."""
    process, paused = started_paused(two_ranks(tiny_csv, tmp_path), tmp_path / "events.jsonl", "train step 1",
                                     pause_rank=1, processes=2, port=free_port())
    time.sleep(1.0)  # rank 0 is now waiting for rank 1 in a collective
    os.kill(paused["pid"], signal.SIGKILL)
    killed = time.monotonic()
    try:
        result = finish(process, timeout=120)
    finally:
        kill_all(process)
    return result, time.monotonic() - killed


HANG_TIMEOUT = 5  # --collective-timeout of hang_a_rank


def hang_a_rank(tiny_csv, tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Two ranks, rank 1 frozen at optimizer step 1 (it stays frozen until torchrun stops it), with
    --collective-timeout HANG_TIMEOUT: torchrun's result, and the seconds from the freeze to its end."""
    process, paused = started_paused(two_ranks(tiny_csv, tmp_path, "--collective-timeout", HANG_TIMEOUT),
                                     tmp_path / "events.jsonl", "train step 1", pause_rank=1, processes=2,
                                     port=free_port())
    try:
        result = finish(process, timeout=120)
    finally:
        kill_all(process)
    return result, time.time() - paused["t"]


@pytest.fixture
def killed_rank(early_runs):
    """kill_a_rank's result and seconds (started with the session, in a thread), and its folder."""
    return early_runs["killed_rank"], early_runs.folders["killed_rank"]


@pytest.fixture
def hung_rank(early_runs):
    """hang_a_rank's result and seconds (started with the session, in a thread)."""
    return early_runs["hung_rank"]


@pytest.mark.slow
@pytest.mark.late
def test_a_killed_rank_ends_the_other_at_once(killed_rank):
    (result, seconds), tmp_path = killed_rank
    line = rank0_error(result)
    assert "lost the connection to another process, which probably died" in line
    assert f"--resume {tmp_path / 'run'}" in line
    assert seconds < 30, seconds
    record("rank death", "rank 1 of 2 SIGKILLed while rank 0 waits in a collective",
           f"all ended {seconds:.1f} s after the kill", message=line, seconds=round(seconds, 1))


@pytest.mark.slow
@pytest.mark.late
def test_a_hung_rank_ends_the_other_after_the_collective_timeout(hung_rank):
    result, seconds = hung_rank
    line = rank0_error(result)
    assert f"no answer from the other processes within --collective-timeout {HANG_TIMEOUT} s" in line
    assert HANG_TIMEOUT <= seconds < HANG_TIMEOUT + 30, seconds
    record("rank death", f"rank 1 of 2 frozen (--collective-timeout {HANG_TIMEOUT})",
           f"all ended {seconds:.1f} s after it froze", message=line, seconds=round(seconds, 1))


# the scenarios start_early starts in threads, by the fixture (or test) name that asks for each
SCENARIOS = {"sigterm_and_sigint": stop_twice, "stopped_with_skipped_images": stop_with_skipped_images,
             "killed_rank": kill_a_rank, "hung_rank": hang_a_rank}


# ----------------------------------------------------------------------------- faults on a finished run

def _without_dac_override():
    """For root: give up the right to write where permissions say no (CAP_DAC_OVERRIDE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def permissions_apply() -> bool:
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"fixres-ro-{os.getpid()}"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        drop = _without_dac_override if os.geteuid() == 0 else None
        return subprocess.run(["touch", str(probe / "x")], preexec_fn=drop, capture_output=True).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        probe.chmod(0o755)
        shutil.rmtree(probe)


@contextlib.contextmanager
def full_disk(folder: Path):
    """A 32 MB tmpfs at `folder` when this process may mount one (root); yields whether it could."""
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(folder)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


class Evil:
    """Unpickling this calls exec: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pickle ran')",)


@pytest.fixture(scope="session")  # as reference
def faults(reference, tmp_path_factory):
    """Copies of the reference run, each damaged one way, resumed by train.py."""
    root = tmp_path_factory.mktemp("faults")
    newest = lambda run: ckpt.RunFolder(run).checkpoints()[-1]  # noqa: E731
    cases, prepared = {}, {}

    def copy(name, base=root):
        run = base / name
        shutil.copytree(reference["run"], run)
        prepared[name] = {"run": run}
        return run

    # numerical: a learning rate that blows the weights up in the 4th epoch, mid-epoch or at its end
    cases["nan_step"] = [copy("nan_step"), "--epochs", 4, "--lr", 1e38]
    cases["nan_eval"] = [copy("nan_eval"), "--epochs", 20, "--lr", 1e38, "--batch-size", 48]  # 1 step/epoch
    # disk: the 4th epoch's checkpoint cannot be written
    with full_disk(root / "disk") as mounted:
        if mounted:  # a real full file system: fill all but 256 KB (the start-up writes fit, a checkpoint does not)
            run = copy("disk_full", root / "disk")
            with open(root / "disk" / "filler", "wb") as f:
                os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(run).free - 256 * 1024)
            cases["disk_full"] = [run, "--epochs", 4]
        else:  # no mount: a 512 KB file-size limit makes the same writes fail, for any user
            cases["disk_full"] = [copy("disk_full"), "--epochs", 4]

            def limit():
                resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, resource.RLIM_INFINITY))
        read_only = permissions_apply()
        if read_only:
            run = copy("read_only")
            (run / "checkpoints").chmod(0o555)
            cases["read_only"] = [run, "--epochs", 4]
        # loading: a pickle that would run code, truncated files, a config file from elsewhere
        run = copy("evil_state")
        for checkpoint in ckpt.RunFolder(run).checkpoints():  # all: one bad checkpoint alone is passed over
            torch.save({"optimizer": Evil(root / "MARKER"), "run": {}}, checkpoint / ckpt.STATE_FILE)
        cases["evil_state"] = [run]
        run = copy("truncated_weights")
        path = newest(run) / ckpt.WEIGHTS_FILE
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        cases["truncated_weights"] = [run]
        run = copy("truncated_state")
        path = newest(run) / ckpt.STATE_FILE
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        cases["truncated_state"] = [run]
        for name, edit in (("config_unknown_key", {"colour_jitter": 0.4}), ("config_bad_type", {"epochs": "ten"})):
            run = copy(name)
            config = json.loads((run / "config.json").read_text())
            (run / "config.json").write_text(json.dumps({**config, **edit}))
            cases[name] = [run]
        for name in prepared:
            prepared[name]["before"] = digest(newest(prepared[name]["run"]))

        preexec = {"read_only": _without_dac_override if os.geteuid() == 0 else None,
                   "disk_full": None if mounted else limit}

        # a run that needs a process of its own (a preexec_fn) starts now, beside the tests that run
        # meanwhile; the others run in this process when a test first asks for them
        started = Started()
        for name, (resume, *extra) in cases.items():
            if preexec.get(name):
                started.start(name, "train.py", "--resume", resume, *extra, preexec_fn=preexec[name])
            else:
                started.start(name, "train.py", "--resume", resume, *extra, in_process=True)
        faults = {"results": started, "prepared": prepared, "marker": root / "MARKER", "mounted": mounted,
                  "read_only": read_only}
        yield faults
        started.collect_all()
        if read_only:
            (prepared["read_only"]["run"] / "checkpoints").chmod(0o755)


def result_of(faults, name) -> subprocess.CompletedProcess:
    assert name in faults["results"], f"{name}: no result"
    return faults["results"][name]


def intact(faults, name):
    """The damaged run's newest checkpoint is byte for byte what it was, and loads."""
    info = faults["prepared"][name]
    newest = ckpt.RunFolder(info["run"]).checkpoints()[-1]
    assert digest(newest) == info["before"]
    check_run_folder(info["run"])
    return newest


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("nan_step", r"error: loss is nan at optimizer step 10 \(learning rate \S+\); lower --lr"),
    ("nan_eval", r"error: validation loss is nan after epoch 4 \(optimizer step 10, learning rate \S+\); lower --lr"),
])
def test_a_non_finite_loss_stops_with_step_lr_and_hint_keeping_the_last_good_checkpoint(faults, case, message):
    line = error_line(result_of(faults, case))
    assert re.match(message, line), line
    newest = intact(faults, case)
    assert newest.name == "epoch-0003-step-000009"  # nothing saved from the diverged weights
    assert line.endswith(f"the last checkpoint is {newest}")
    assert weights(faults["prepared"][case]["run"] / "last.safetensors")["fc.weight"].isfinite().all()
    record("numerical", {"nan_step": "loss becomes NaN mid-epoch (--lr 1e38)",
                         "nan_eval": "weights diverge in an epoch's last step (--lr 1e38, 1 step an epoch)"}[case],
           "stopped, exit 2, no checkpoint of the diverged weights", message=line)


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_path(faults):
    line = error_line(result_of(faults, "disk_full"))
    run = faults["prepared"]["disk_full"]["run"]
    previous = intact(faults, "disk_full")
    reason = "No space left on device" if faults["mounted"] else "File too large"
    assert line == (f"error: cannot write {run / 'checkpoints' / 'epoch-0004-step-000012'}: {reason}; "
                    f"the previous checkpoint {previous} is intact")
    assert temporaries(run) == []  # the half-written checkpoint folder is gone
    how = "a full tmpfs" if faults["mounted"] else "a 512 KB file-size limit (RLIMIT_FSIZE)"
    record("disk", f"checkpoint write fails: {how}", "stopped, exit 2, previous checkpoint intact", message=line)


@pytest.mark.slow
@pytest.mark.late  # its real run starts with `faults`, and goes on beside the other tests
def test_a_read_only_checkpoint_folder_keeps_the_previous_checkpoint_and_names_the_path(faults):
    if not faults["read_only"]:
        pytest.skip("permissions are not enforced for this user")
    line = error_line(result_of(faults, "read_only"))
    run = faults["prepared"]["read_only"]["run"]
    previous = intact(faults, "read_only")
    assert line == (f"error: cannot write {run / 'checkpoints' / 'epoch-0004-step-000012'}: Permission denied; "
                    f"the previous checkpoint {previous} is intact")
    record("disk", "checkpoint write fails: checkpoints/ read-only", "stopped, exit 2, previous checkpoint intact",
           message=line)


@pytest.mark.slow
def test_a_malicious_pickle_in_a_checkpoint_is_refused_and_does_not_run(faults):
    line = error_line(result_of(faults, "evil_state"))
    state = ckpt.RunFolder(faults["prepared"]["evil_state"]["run"]).checkpoints()[-1] / ckpt.STATE_FILE
    assert line.startswith(f"error: {state}: refused: it holds pickled Python objects (it would call exec), not "
                           f"only tensors and plain values; nothing was loaded or run"), line
    assert not faults["marker"].exists()
    # the file is live: plain unpickling runs its code
    torch.load(state, weights_only=False)
    assert faults["marker"].read_text() == "pickle ran"
    faults["marker"].unlink()
    record("safe loading", "state.pt whose unpickling calls exec (writes a marker file)",
           "refused, exit 2, marker not created (torch.load(weights_only=False) does create it)", message=line)


@pytest.mark.slow
@pytest.mark.parametrize("case, damaged", [("truncated_weights", ckpt.WEIGHTS_FILE), ("truncated_state", ckpt.STATE_FILE)])
def test_a_truncated_newest_checkpoint_is_passed_over_for_the_one_before(faults, case, damaged):
    result = result_of(faults, case)
    assert result.returncode == 0, result.stderr[-3000:]
    run = faults["prepared"][case]["run"]
    older, newest = ckpt.RunFolder(run).checkpoints()[-2:]  # the newest rewritten under its own name by the resumed run
    warning = next(line for line in result.stderr.splitlines() if line.startswith("warning: --resume"))
    assert f"{newest}/{damaged}" in warning and warning.endswith(f"resuming from {older}"), warning
    check_run_folder(run)
    what = {"truncated_weights": "checkpoint: the newest model.safetensors cut in half",
            "truncated_state": "checkpoint: the newest state.pt cut in half"}[case]
    record("bad input", what, "passed over with a warning naming both; resumed from the checkpoint before",
           message=warning, item=16)


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("config_unknown_key", "{run}/config.json: unknown key(s) colour_jitter"),
    ("config_bad_type", "{run}/config.json: epochs must be int, got 'ten'"),
])
def test_a_damaged_run_folder_is_refused_in_one_line(faults, case, message):
    run = faults["prepared"][case]["run"]
    line = error_line(result_of(faults, case))
    assert line.startswith("error: " + message.format(newest=ckpt.RunFolder(run).checkpoints()[-1], run=run)), line
    what, item = {"config_unknown_key": ("config: a run's config.json with an unknown key", 17),
                  "config_bad_type": ("config: a run's config.json with a value of the wrong type", None)}[case]
    record("bad input", what, "refused", message=line.removeprefix("error: "), item=item)


@pytest.mark.slow
def test_best_weights_stay_among_the_epochs_kept_after_a_fallback(tiny_csv, tmp_path, monkeypatch):
    """Epoch 3 became the best; its checkpoint is then cut in half, so the resume passes over it
    and trains epoch 3 again, which scores lower this time. best.safetensors must go back to
    epoch 1's weights (the best of the epochs metrics.jsonl keeps), not stay the discarded ones."""
    import fixres.training
    scores = []  # the validation top-1 each epoch reports, in order
    real_evaluate = fixres.training.evaluate

    def scripted_evaluate(model, **kwargs):
        return {**real_evaluate(model, **kwargs), "accuracy": scores.pop(0)}

    monkeypatch.setattr(fixres.training, "evaluate", scripted_evaluate)
    main = script_main("train.py")
    run = tmp_path / "run"
    args = [*map(str, train_args(tiny_csv, tmp_path)), "--cpu"]
    scores[:] = [0.6]
    assert run_main(main, [*args, "--stop-after", "1"]) == 0
    epoch_1 = shutil.copy(run / "best.safetensors", tmp_path / "epoch-1.safetensors")
    scores[:] = [0.5, 0.9]
    assert run_main(main, [*args, "--resume", str(run), "--stop-after", "2"]) == 0  # the two epochs left
    assert fileio.load_weights(run / "best.safetensors")[1]["epoch"] == 3  # the best so far
    state = ckpt.RunFolder(run).checkpoints()[-1] / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    scores[:] = [0.4]
    assert run_main(main, [*args, "--resume", str(run)]) == 0
    assert [r["val_acc"] for r in metrics(run)] == [0.6, 0.5, 0.4]
    best, meta = fileio.load_weights(run / "best.safetensors")
    assert (meta["epoch"], meta["val_acc"]) == (1, 0.6)
    assert_same_weights(epoch_1, run / "best.safetensors")


# ----------------------------------------------------------------------------- bad inputs, in-process

def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height pixels in a few bytes: what a decompression bomb looks like to Pillow."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [10_000, 20_000], ids=["over the limit (warning)", "over twice the limit (error)"])
def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path, side):
    assert side * side > Image.MAX_IMAGE_PIXELS
    path = png_header(tmp_path / "bomb.png", side, side)
    with pytest.raises(BadImageError) as err:
        open_image(str(path))
    line = str(err.value)
    assert line.startswith(f"cannot decode image {path}: Image size ({side * side} pixels) exceeds limit")
    record("bad input", f"image: decompression bomb, a {side} x {side} px PNG ({side * side / 1e6:.0f} M pixels)",
           "refused", message=line, item=9)


@pytest.mark.parametrize("args, message", [
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    (["--collective-timeout", "0"], "--collective-timeout must be > 0 seconds, got 0.0"),
])
def test_non_finite_and_non_positive_options_are_refused(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        parse_command_line(TrainConfig, ["--data", "x.csv", *args], "train")
    assert exit_.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith(f"error: {message}"), line
    record("bad input", f"option: {' '.join(args)}", "refused", message=line.split(": error: ", 1)[1], item=None)
