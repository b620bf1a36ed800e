"""What the scripts share at their edges: one-line errors instead of tracebacks, and the garbage
collector turned back on after their imports (collect_from_here)."""
from __future__ import annotations

import gc
import os
import signal
import sys

import torch.distributed as dist

from fixres.checkpoint import CheckpointError
from fixres.classifiers import ModelError
from fixres.config import ConfigError
from fixres.data import DataError
from fixres.engine import NonFiniteLossError, ProcessGroupError

USER_ERRORS = (CheckpointError, ConfigError, DataError, ModelError, NonFiniteLossError, ProcessGroupError)


def one_line(err: BaseException) -> str:
    """The user-facing line of an error. A DataLoader worker re-raises our errors with
    the worker's traceback folded into the message; its last line is ours."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    for cls in USER_ERRORS + (type(err),):
        last = last.removeprefix(f"{cls.__module__}.{cls.__name__}: ")
    return last


# A run stopped by SIGTERM, SIGINT or SIGUSR1 after saving its checkpoint: not finished, not
# failed; "try again later" (sysexits' EX_TEMPFAIL). slurm/ wrappers requeue on it.
STOPPED_EXIT = 75


def run_main(main, argv=None) -> int:
    """Call main(argv); user errors become `error: <one line>` and exit status 2 (on every rank
    under torchrun, though it sends the others SIGTERM when the first exits); a run that
    a signal stopped with a checkpoint (main returns {"stopped": True}) exits with STOPPED_EXIT."""
    collect_from_here()
    try:
        result = main(argv)
    except USER_ERRORS as err:
        # one write, newline included (print makes two): the ranks' lines share torchrun's stderr
        sys.stderr.write(f"error: {one_line(err)}\n")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # The ranks stop on the same error, but torchrun sends SIGTERM to the others once the first
            # exits, while they still tear down (seconds); ignored (Python's finalisation keeps SIG_IGN,
            # not a handler), they end with this status rather than -15. A hang still gets its SIGKILL.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return 2
    finally:
        end_process_group()
    return STOPPED_EXIT if isinstance(result, dict) and result.get("stopped") else 0


def collect_from_here() -> None:
    """Turns Python's cyclic garbage collector back on, if a script turned it off for its imports
    (train.py, sweep.py and finetune.py do, when run as scripts). torch, torchvision, timm and
    accelerate leave over half a million tracked objects that live as long as the process, and each full
    pass of the collector walked all of them: about 30% of a short CPU run's time went to it
    (docs/benchmarks.md). gc.freeze() keeps them out of the passes that follow, those of
    fork-started DataLoader workers included; the few thousand objects of the imports' own garbage
    stay with them. Where the collector runs already (a caller that imports fixres, the tests'
    in-process runs), nothing changes."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def end_process_group() -> None:
    """Destroys the process group, if this process joined one, while the interpreter is whole: left
    to its teardown, gloo's threads can abort the process (SIGABRT, "terminate called without an
    active exception") after its last line, most often when it ends before the other ranks."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
