"""Several 2-process runs in one torchrun launch: each run's script (train.py, finetune.py) has its
main(argv) called in turn in each process, in the one process group torchrun set up, so the runs
of a test session pay for one launch (two new interpreters importing torch, timm and accelerate:
most of a small 2-process run's time on the test machine). Between runs, each process is put
back as it was (tests/script_runs.py's in_a_run: a fresh Accelerate state, the environment,
random generators, ...), torchrun's process group kept.

    python -m torch.distributed.run --nproc_per_node 2 tests/launch_runs.py OUT -- NAME SCRIPT ARGS -- NAME SCRIPT ARGS ...

For runs that should finish, and what differs from each under a torchrun of its own: the process
group is the first run's (set up by its train.py or finetune.py, with the default collective
timeout; the later runs find it made), and a run that fails ends the launch there (the process
exits, torchrun ends the other; the runs after it are not done), where its own torchrun would
have ended the same way. Each run's exit status (0; or 1 and its traceback in .err), stdout and
stderr are written to OUT/NAME.rank<R>.status, .out and .err; tests/script_runs.py's Started
reads them back, with the launch's own exit status (a crash in an interpreter's teardown fails
every run of it), as one CompletedProcess a run (start_together, launch_together).
"""
import gc
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # as the scripts do
    gc.disable()  # for the imports; run_main turns it back on
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # torchrun puts tests/ first; the scripts are above

from fixres.cli import run_main  # noqa: E402
from tests.script_runs import ROOT, _captured, script_main  # noqa: E402


def runs(argv: list[str]) -> tuple[Path, list[tuple[str, str, list[str]]]]:
    out, rest = Path(argv[0]), argv[1:]
    parts, current = [], None
    for arg in rest:
        if arg == "--":
            current = []
            parts.append(current)
        else:
            current.append(arg)
    return out, [(part[0], part[1], part[2:]) for part in parts]


def finished(main, args: list[str]) -> int:
    main(args)  # a run that raises: _captured's status 1 and traceback
    return 0


def main(argv: list[str]) -> int:
    out, planned = runs(argv)
    rank = os.environ["RANK"]
    for name, script, args in planned:
        result = _captured([str(ROOT / script), *args], None, lambda: finished(script_main(script), args),
                           keep_process_group=True)
        for kind, text in (("out", result.stdout), ("err", result.stderr)):
            (out / f"{name}.rank{rank}.{kind}").write_text(text)
        (out / f"{name}.rank{rank}.status").write_text(str(result.returncode))  # last: the run's files are whole
        if result.returncode != 0:  # the other rank may wait in a collective of this run: not the next run's
            raise SystemExit(result.returncode)  # through run_main, which ends the process group
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))  # which ends the process group once, after the last run
