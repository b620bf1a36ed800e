"""How a run stops early: a signal asks for a checkpoint, or a collective fails.

    stop = StopRequest(accelerator)   # SIGTERM, SIGINT, SIGUSR1 -> stop() is True on every rank at one step
    ...
    stop.restore()
"""
from __future__ import annotations

import re
import signal

import torch
from accelerate import Accelerator

from fixres.runtime import error_reason


class StopRequest:
    """SIGTERM, SIGINT and SIGUSR1 (SLURM's early warning) ask for a checkpoint at the
    next step boundary; every rank stops at the same step because the flag is reduced."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.received: str | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __call__(self) -> bool:
        flag = torch.tensor(float(self.received is not None), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "max").item() > 0)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def collective_failed(err: RuntimeError) -> bool:
    # gloo raises a plain RuntimeError that names its source file; NCCL a DistBackendError
    return isinstance(err, torch.distributed.DistError) or "/gloo/" in str(err)


def collective_failure(err: RuntimeError, timeout_s: float) -> str:
    """What a failed collective means, in words, with torch's own reason when it helps."""
    text = error_reason(err)
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (f"no answer from the other processes within --collective-timeout {timeout_s:g} s "
                f"(one of them hangs, or its machine is gone)")
    reason = re.sub(r"^\[[^\]]*\] ", "", text).split(". ")[0]  # gloo's "[file.cc:561] Connection closed by peer ..."
    return f"lost the connection to another process, which probably died ({reason})"
