"""The runners of tests/script_runs.py: a real interpreter reports what `python script` would,
and a run in this process gives what one would and leaves nothing of itself behind."""
from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState

import fixres.training
from tests.conftest import ROOT, TINY_TRAIN, error_line, run_file_in_process, run_in_process, run_script


# ----------------------------------------------------------------------------- real interpreters

# run at exit before os.abort (atexit runs the last registered first): the garbage collector's state
GC_AT_EXIT = """
import atexit, gc, json, os
atexit.register(os.abort)
atexit.register(lambda: open(os.environ["FIXRES_GC_AT_EXIT"], "w").write(json.dumps({
    "enabled": gc.isenabled(), "frozen": gc.get_freeze_count(),
    "collections": [generation["collections"] for generation in gc.get_stats()]})))
"""


def crash_at_teardown(root) -> dict:
    """`--help` of a tiny script that imports nothing (the runner's own doing) and of train.py (what
    a user runs), each a real run whose interpreter aborts once the script is done (a
    `sitecustomize` at startup registers os.abort at exit, and before it a report of the garbage
    collector's state): {script: (its path, the result, the collector's state at exit)}."""
    (root / "sitecustomize.py").write_text(GC_AT_EXIT)
    tiny = root / "ends_well.py"
    tiny.write_text("import sys\nprint('usage: ends_well.py')\nsys.exit(0)\n")
    runs = {}
    for name, script in (("tiny", tiny), ("train.py", "train.py")):
        report = root / f"{Path(script).stem}.gc.json"
        result = run_script(script, "--help", env={"PYTHONPATH": str(root), "FIXRES_GC_AT_EXIT": str(report)})
        runs[name] = (script, result, json.loads(report.read_text()) if report.exists() else None)
    return runs


@pytest.fixture
def teardown_crashes(early_runs) -> dict:
    return early_runs["teardown_crashes"]


@pytest.mark.late
@pytest.mark.parametrize("script", [
    "tiny",  # a script that imports nothing: the runner's own doing
    pytest.param("train.py", marks=pytest.mark.slow),  # what a user runs: `python train.py --help`
])
def test_a_crash_in_the_interpreters_teardown_fails_the_run(teardown_crashes, script):
    """A library that aborts once the script is done (gloo's threads at exit, say) fails a real run,
    as `python train.py` reports it: the script's own work finished normally."""
    script, result, _ = teardown_crashes[script]
    assert result.stdout.startswith(f"usage: {os.path.basename(script)}"), result.stdout
    assert result.returncode == -signal.SIGABRT, (result.returncode, result.stderr[-2000:])


@pytest.mark.late
def test_a_script_imports_without_the_garbage_collector_then_runs_with_the_imports_frozen(teardown_crashes):
    """`python train.py` turns Python's cyclic garbage collector off for its imports, and run_main
    turns it back on with what they made frozen (fixres/cli.py's collect_from_here): no full pass
    walked the imports' objects (with the collector on, 6 did), and none will. The tiny script,
    which leaves the collector alone, shows what the interpreter does by itself."""
    _, result, state = teardown_crashes["train.py"]
    assert state is not None, result.stderr[-2000:]
    assert state["enabled"] and state["collections"][2] == 0, state
    assert state["frozen"] > 100_000, state  # train.py --help: 574,678 in one run
    _, result, alone = teardown_crashes["tiny"]
    assert alone is not None, result.stderr[-2000:]
    assert alone["enabled"] and alone["frozen"] == 0, alone


def run_reads(root) -> subprocess.CompletedProcess:
    """A real run of a script that prints what its interpreter read when it started."""
    script = root / "reads.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        import torch
        print(sys.flags.hash_randomization, torch.get_num_threads(), os.environ["FIXRES_PROBE"])
    """))
    return run_script(script, env={"PYTHONHASHSEED": "0", "FIXRES_PROBE": "given"}, timeout=120)


def start_early(started, fixtures: set[str], tmp_path_factory, tiny_csv) -> None:
    """conftest's early_runs calls this as the session starts: the new interpreters of run_reads and
    crash_at_teardown, each in a thread, on a core this process leaves idle."""
    if "reads_run" in fixtures:
        started.call("reads_run", run_reads, tmp_path_factory.mktemp("reads"), real_runs=True)
    if "teardown_crashes" in fixtures:
        started.call("teardown_crashes", crash_at_teardown, tmp_path_factory.mktemp("crashes"), real_runs=True)


@pytest.fixture
def reads_run(early_runs) -> subprocess.CompletedProcess:
    return early_runs["reads_run"]


@pytest.mark.late
def test_the_environment_read_when_the_interpreter_starts_reaches_a_real_run(reads_run):
    """What is read once, at startup or import: the hash seed, and OpenMP's thread count (libgomp
    reads it when torch is imported: one thread a run, the test machine's cores being few)."""
    result = reads_run
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0", "1", "given"]


# ----------------------------------------------------------------------------- in this process

PROBE = """
import os, sys
from fixres.config import ConfigError

def main(argv):
    print("argv", sys.argv[1:], "cwd", os.getcwd(), "probe", os.environ.get("FIXRES_PROBE"))
    print("to stderr", file=sys.stderr)
    action = argv[0]
    if action == "message":
        sys.exit("a message")
    if action == "raise":
        raise ValueError("raised")
    if action == "refuse":
        raise ConfigError("--option is refused")
    if action == "exit":
        sys.exit(int(argv[1]))
    if action == "leave":  # everything a careless run could leave in the process that runs it
        import logging, signal, threading, warnings
        import matplotlib, torch, torch.distributed as dist
        from accelerate import Accelerator
        signal.signal(signal.SIGUSR1, lambda *_: None)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.environ["FIXRES_LEFT"] = "1"
        os.chdir("/")
        sys.argv.append("left")
        torch.manual_seed(7)
        torch.set_default_dtype(torch.float64)
        torch.set_flush_denormal(True)
        logging.basicConfig(level=logging.DEBUG)
        warnings.simplefilter("error")
        matplotlib.rcParams["lines.linewidth"] = 9
        Accelerator(cpu=True)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{argv[1]}", rank=0, world_size=1)
        threading.Thread(target=lambda: None).start()
        import gc
        gc.disable()
        gc.freeze()
    return {"stopped": action == "stop"}
"""


@pytest.fixture
def probe(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return path


@pytest.mark.parametrize("args, status, last_line", [
    (["finish"], 0, "to stderr"),
    (["stop"], 75, "to stderr"),  # stopped by a signal, with its checkpoint: fixres.cli.STOPPED_EXIT
    (["refuse"], 2, "error: --option is refused"),
    (["exit", "3"], 3, "to stderr"),
    (["message"], 1, "a message"),
    (["raise"], 1, "ValueError: raised"),
])
def test_an_in_process_run_exits_and_prints_as_the_script_would(probe, capsys, args, status, last_line):
    result = run_in_process(probe, *args, env={"FIXRES_PROBE": "given"})
    assert result.returncode == status
    assert result.stdout.splitlines()[0] == f"argv {args} cwd {ROOT} probe given"  # the repository, as a real run
    assert result.stderr.splitlines()[-1] == last_line
    assert capsys.readouterr() == ("", "")  # the run's output is the run's, not the test's


def test_what_an_in_process_run_leaves_is_undone(probe, tmp_path, monkeypatch):
    import matplotlib
    from tests.script_runs import flushes_denormals, free_port
    monkeypatch.chdir(tmp_path)
    before = {**process_state(), "flush": flushes_denormals(), "warnings": warnings.filters[:],
              "linewidth": matplotlib.rcParams["lines.linewidth"]}
    result = run_in_process(probe, "leave", free_port())
    assert result.returncode == 0, result.stderr[-3000:]
    after = {**process_state(), "flush": flushes_denormals(), "warnings": warnings.filters[:],
             "linewidth": matplotlib.rcParams["lines.linewidth"]}
    assert torch.equal(after.pop("rng"), before.pop("rng"))
    assert after == before
    assert (AcceleratorState._shared_state, PartialState._shared_state, GradientState._shared_state) == ({}, {}, {})
    assert not dist.is_initialized()


class Seen:
    """The process as train.py saw it while it trained, recorded by a wrapper of its epoch loop."""

    def __init__(self, monkeypatch, fail: bool):
        self.state = None
        real = fixres.training.train_one_epoch

        def train_one_epoch(*args, **kwargs):
            self.state = {"argv": sys.argv[:], "cwd": os.getcwd(), "env": dict(os.environ),
                          "threads": torch.get_num_threads(), "sigterm": signal.getsignal(signal.SIGTERM),
                          "accelerate": dict(AcceleratorState._shared_state)}
            if fail:
                raise RuntimeError("failed in the first epoch")
            return real(*args, **kwargs)

        monkeypatch.setattr(fixres.training, "train_one_epoch", train_one_epoch)


def process_state() -> dict:
    return {"argv": sys.argv[:], "cwd": os.getcwd(), "env": dict(os.environ), "threads": torch.get_num_threads(),
            "signals": {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)},
            "rng": torch.get_rng_state(), "dtype": torch.get_default_dtype(),
            "root handlers": logging.root.handlers[:], "root level": logging.root.level,
            "cudnn.benchmark": torch.backends.cudnn.benchmark, "collector": (gc.isenabled(), gc.get_freeze_count())}


@pytest.mark.parametrize("fail", [False, True], ids=["trains", "fails mid-epoch"])
def test_an_in_process_run_leaves_the_process_as_it_found_it(tmp_path, tiny_csv, monkeypatch, fail):
    """train.py in this process: while it runs, its signal handlers (fixres.stopping), Accelerate's
    state, one thread, the repository as folder and its own argv; after it, whether it ended or
    raised, this process's own, and no Accelerate state or process group left."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["the test's argv"])
    monkeypatch.setenv("FIXRES_TEST_OWN", "1")
    previous_usr1 = signal.signal(signal.SIGUSR1, lambda *_: None)  # a handler of the test's own
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    Accelerator(cpu=True)  # state a test leaves: the run must not inherit it
    torch.manual_seed(123)
    try:
        before = process_state()
        seen = Seen(monkeypatch, fail)
        result = run_in_process("train.py", "--data", tiny_csv, *TINY_TRAIN, "--epochs", 1, "--cpu",
                                "--output", tmp_path / "runs", "--name", "run", env={"FIXRES_PROBE": "given"})
        after = process_state()
    finally:
        signal.signal(signal.SIGUSR1, previous_usr1)
        torch.set_num_threads(threads)

    assert result.returncode == (1 if fail else 0), result.stderr[-3000:]
    if fail:
        assert result.stderr.splitlines()[-1] == "RuntimeError: failed in the first epoch"
    during = seen.state
    assert during["argv"][0] == str(ROOT / "train.py") and during["cwd"] == str(ROOT)
    assert during["env"]["FIXRES_PROBE"] == "given" and during["env"]["OMP_NUM_THREADS"] == "1"
    assert during["threads"] == 1
    assert getattr(during["sigterm"], "__self__", None).__class__.__name__ == "StopRequest"
    assert during["accelerate"]["_cpu"] is True  # the run's own Accelerator

    for key in before:
        if key == "rng":
            assert torch.equal(after[key], before[key])
        else:
            assert after[key] == before[key], key
    assert (AcceleratorState._shared_state, PartialState._shared_state, GradientState._shared_state) == ({}, {}, {})
    assert not dist.is_initialized()


def test_an_in_process_error_line_is_the_scripts(tmp_path):
    """What the tests read from a refused run: one line and status 2, as from `python train.py`."""
    result = run_in_process("train.py", "--data", tmp_path / "none.csv", *TINY_TRAIN, "--output", tmp_path)
    assert "none.csv" in error_line(result)


def test_a_file_run_in_process_imports_fixres_only_from_where_it_is(tmp_path):
    """run_file_in_process (the benchmarks' --help): as `python FILE` from the file's folder, which
    finds fixres only where the file puts the repository on sys.path; this process's own fixres
    modules are the same objects afterwards."""
    lost = tmp_path / "lost.py"
    lost.write_text("import fixres.config\nprint('usage: lost.py')\n")
    found = tmp_path / "found.py"
    found.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport fixres.config\n"
                     "print('usage: found.py', fixres.config.__file__)\n")
    before = {name: module for name, module in sys.modules.items() if name.startswith("fixres")}
    failed = run_file_in_process(lost, "--help")
    assert failed.returncode == 1 and "ModuleNotFoundError: No module named 'fixres'" in failed.stderr, failed.stderr
    done = run_file_in_process(found, "--help")
    assert done.returncode == 0 and done.stdout.split() == ["usage:", "found.py", str(ROOT / "fixres" / "config.py")]
    assert {name: module for name, module in sys.modules.items() if name.startswith("fixres")} == before
    assert sys.path[0] != str(tmp_path)
