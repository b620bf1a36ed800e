"""How often a rank that ends before the others aborts in its teardown (SIGABRT, "terminate
called without an active exception") when it leaves its gloo process group alive, against when
it destroys the group first, as fixres.cli.run_main does on every exit.

    python benchmarks/experiments/gloo_exit.py --trials 20      # about 3 minutes on 2 CPU cores

Each trial is one `torchrun --nproc_per_node 2` of this file as a worker: a few all_reduce and
all_gather calls over gloo (what a training step's loss check and an evaluation do), then rank 1
exits with status 2 at once while rank 0 is still busy for 2 s, as when one rank meets an error
first. Trials alternate between the two ways so that both see the same machine load.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time


def worker(destroy: bool) -> int:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    values = torch.ones(1000)
    for _ in range(20):
        dist.all_reduce(values)
        gathered = [torch.zeros(1) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, torch.ones(1))
    if destroy:
        dist.destroy_process_group()
    if os.environ["RANK"] == "0":
        time.sleep(2)
    return 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trial(destroy: bool) -> list[int]:
    """The exit status of each rank, as torchrun reports them."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", __file__, "--worker", "--destroy", str(int(destroy))],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    return [int(code) for code in re.findall(r"^\s*exitcode\s+: (-?\d+)", result.stderr, re.MULTILINE)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials of each way")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--destroy", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(bool(args.destroy))
    aborted = {False: 0, True: 0}
    for _ in range(args.trials):
        for destroy in (False, True):
            aborted[destroy] += -6 in trial(destroy)
    print("| the rank that ends first | trials | a rank aborted (SIGABRT) |")
    print("| --- | --- | --- |")
    for destroy, label in ((False, "leaves the gloo group alive"), (True, "destroys it first")):
        print(f"| {label} | {args.trials} | {aborted[destroy]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
