"""train.py with named pause points, for tests that kill or signal it at a chosen moment.

    python tests/kill_harness.py --data ... --epochs 3        # = python train.py --data ... --epochs 3

runs train.py's own main in this process, after wrapping a few functions so that
each interesting moment is an *event* with a stable name, appended as a JSON line to
$FIXRES_EVENTS:

    train step 4                       a training batch is about to run optimizer step 4
    eval after step 5 batch 0          an evaluation batch is about to run
    write checkpoints/epoch-0002-step-000006/state.pt
                                       a file's temporary copy is complete, not yet renamed
    renamed checkpoints/epoch-0002-step-000006
                                       a rename (file, checkpoint folder, pruned folder) is done
    signal SIGTERM                     train.py's stop handler received a signal

Files written more than once per run (last.safetensors, metrics.jsonl, ...) get
" after step N" appended, or " at start" before any training step. With
$FIXRES_PAUSE_AT set to an event's name, the process stops at that event (on rank
$FIXRES_PAUSE_RANK only, when set) and waits: for a SIGKILL, or for a signal that
train.py handles, after which it carries on. Nothing else changes: the tests kill
the real training process with real signals, at moments they can name.
"""
from __future__ import annotations

import gc
import json
import os
import re
import runpy
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- inside the training process

class Events:
    def __init__(self, log: str | None, pause_at: str | None, pause_rank: str | None):
        self.log = open(log, "a") if log else None
        self.pause_at = pause_at
        self.rank = os.environ.get("RANK", "0")
        self.pause_here = pause_rank is None or pause_rank == self.rank
        self.last_step: int | None = None
        self.resume = False
        self.emit("start", f"start rank {self.rank}")

    def emit(self, kind: str, key: str) -> None:
        if self.log:
            self.log.write(json.dumps({"t": time.time(), "pid": os.getpid(), "rank": self.rank,
                                       "kind": kind, "key": key}) + "\n")
            self.log.flush()
        if self.pause_here and key == self.pause_at:
            self.pause_here = False  # once per process
            self.emit("paused", key)
            deadline = time.monotonic() + 300  # a test that forgot this process does not leave it forever
            while not self.resume and time.monotonic() < deadline:
                time.sleep(0.005)

    def after(self) -> str:
        return " at start" if self.last_step is None else f" after step {self.last_step}"


def relative(path) -> str:
    """A path as seen from its run folder, with temporary names replaced by what they become:
    checkpoints/.epoch-0002-step-000006.x1y2.tmp/.state.pt.a1b2.tmp -> checkpoints/epoch-0002-step-000006/state.pt"""
    parts = Path(path).parts
    parts = parts[parts.index("checkpoints"):] if "checkpoints" in parts else parts[-1:]
    named = []
    for part in parts:
        if m := re.fullmatch(r"\.(epoch-\d+-step-\d+)\.old\.tmp", part):
            named.append(m.group(1) + " (hidden for pruning)")
        elif m := re.fullmatch(r"\.(epoch-\d+-step-\d+)\..+\.tmp", part):
            named.append(m.group(1))
        elif m := re.fullmatch(r"\.(.+)\.[^.]+\.tmp", part):
            named.append(m.group(1))
        else:
            named.append(part)
    return "/".join(named)


def install(events: Events) -> None:
    import fixres.fileio as fileio
    import fixres.training as training

    original_write = fileio.atomic_write

    def atomic_write(path, write):
        def write_then_announce(tmp):
            write(tmp)
            name = relative(path)
            events.emit("write", f"write {name}" + ("" if name.startswith("checkpoints/") else events.after()))
        original_write(path, write_then_announce)

    fileio.atomic_write = atomic_write

    original_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        original_replace(src, dst, *args, **kwargs)
        name = relative(dst)
        events.emit("rename", f"renamed {name}" + ("" if name.startswith("checkpoints/") else events.after()))

    os.replace = replace

    original_train = training.train_one_epoch

    def train_one_epoch(setup, loader, *args, first_step: int, **kwargs):
        def batches():
            for i, batch in enumerate(loader):
                events.last_step = first_step + i  # grad_accum 1: one optimizer step per batch
                events.emit("train", f"train step {events.last_step}")
                yield batch
        return original_train(setup, batches(), *args, first_step=first_step, **kwargs)

    training.train_one_epoch = train_one_epoch

    original_evaluate = training.evaluate

    def evaluate(model, loader, *args, **kwargs):
        def batches():
            for i, batch in enumerate(loader):
                events.emit("eval", f"eval after step {events.last_step} batch {i}")
                yield batch
        return original_evaluate(model, batches(), *args, **kwargs)

    training.evaluate = evaluate

    original_handle = training.StopRequest._handle

    def handle(self, signum, frame):
        original_handle(self, signum, frame)
        events.resume = True
        events.emit("signal", f"signal {self.received}")

    training.StopRequest._handle = handle


def main() -> None:
    gc.disable()  # for install()'s imports, as train.py does for its own; its run_main turns it back on
    sys.path.insert(0, str(ROOT))
    # empty: not set (start() below always passes both)
    events = Events(os.environ.get("FIXRES_EVENTS"), os.environ.get("FIXRES_PAUSE_AT") or None,
                    os.environ.get("FIXRES_PAUSE_RANK") or None)
    install(events)
    sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


# ----------------------------------------------------------------------------- in the test process

def read_events(path: Path) -> list[dict]:
    return events_from(path, 0)[0]


def events_from(path: Path, start: int) -> tuple[list[dict], int]:
    """The events whose whole line lies after byte `start` of the log (a line still being written
    waits for the next read), and the byte after the last of them."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            added = f.read()
    except FileNotFoundError:
        return [], start
    whole = added[:added.rfind(b"\n") + 1]
    return [json.loads(line) for line in whole.decode().splitlines()], start + len(whole)


def start_options(events: Path, pause_at: str | None = None, pause_rank: int | None = None) -> dict:
    """start_script's keywords for a run of this file: its event log and pause point, in a session
    of its own (kill_all ends torchrun and its workers together)."""
    env = {"FIXRES_EVENTS": str(events), "FIXRES_PAUSE_AT": pause_at or "",
           "FIXRES_PAUSE_RANK": "" if pause_rank is None else str(pause_rank)}
    return {"env": env, "start_new_session": True}


def start(args, *, events: Path, pause_at: str | None = None, pause_rank: int | None = None,
          processes: int = 1, port: int | None = None, preexec_fn=None) -> subprocess.Popen:
    """Start `python tests/kill_harness.py ARGS` (or under torchrun) with its event log (start_options)."""
    # here, not at the top: this file also runs as a script, where tests/ is no package
    from tests.conftest import start_script
    return start_script(Path(__file__), *args, processes=processes, port=port, preexec_fn=preexec_fn,
                        **start_options(events, pause_at, pause_rank))


def wait_for(events: Path, kind: str, process: subprocess.Popen, timeout: float = 300, rank: str | None = None):
    """The first event of `kind` (on `rank`), or an AssertionError if the process ends first."""
    deadline = time.monotonic() + timeout
    read = 0  # each poll (100 a second) parses only the lines added since the one before
    while time.monotonic() < deadline:
        added, read = events_from(events, read)
        for e in added:
            if e["kind"] == kind and (rank is None or e["rank"] == rank):
                return e
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"ended (exit {process.returncode}) before a {kind!r} event\n"
                                 f"{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.01)
    raise AssertionError(f"no {kind!r} event in {timeout} s")


if __name__ == "__main__":
    main()
