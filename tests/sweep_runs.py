"""Several sweeps in one launch: sweep.py's own main once per argument list, in this process,
as `python sweep.py ARGS` runs it; under torchrun every sweep runs in the one process group
torchrun set up, so a test that sweeps several runs with 2 processes pays for one launch (two
new interpreters importing torch, timm and accelerate: most of a 2-process sweep's time here).

    python -m torch.distributed.run --nproc_per_node 2 tests/sweep_runs.py ARGS1 -- ARGS2 -- ...

Exits as sweep.py does (run_main: `error: <line>` and status 2 for a user error). After each
sweep, every rank prints "rank R: speeds {size: [images/s, ms], ...}", the speeds it holds, and
writes which images every row got right, <output>/per_image_correct.<rank>.json
({"size@crop_pct": [0 or 1 per validation image]}), for tests that compare sweeps image for image.
"""
import gc
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # as sweep.py does (tests/test_sweep.py also runs this file in its own process)
    gc.disable()  # for the imports; run_main turns it back on
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # torchrun puts tests/ first; sweep.py is above

import sweep  # noqa: E402  the script, not fixres.sweep
from fixres.cli import run_main  # noqa: E402
from tests import small_torchvision  # noqa: E402

small_torchvision.register()  # the family matrix's tv:small_* models, as its own process registers them


def argument_lists(argv: list[str]) -> list[list[str]]:
    lists = [[]]
    for arg in argv:
        if arg == "--":
            lists.append([])
        else:
            lists[-1].append(arg)
    return [args for args in lists if args]


def save_per_image(result: dict) -> None:
    rows = {f"{r['size']}@{r['crop_pct']}": r["per_image_correct"].int().tolist() for r in result["rows"]}
    rank = os.environ.get("RANK", "0")  # every process holds every row: each writes its own
    (Path(result["output"]) / f"per_image_correct.{rank}.json").write_text(json.dumps(rows))


def main(argv: list[str]) -> None:
    for args in argument_lists(argv):
        result = sweep.main(args)  # run_main ends the process group once, after the last
        save_per_image(result)
        # what this rank holds (sweep.json is the main process's): the same numbers on every rank
        speeds = {row["size"]: [row.get("images_per_s_batch"), row.get("latency_ms")] for row in result["rows"]}
        # one write, newline included: print makes two, and the ranks share torchrun's stdout (with
        # PYTHONUNBUFFERED=1 each write goes out at once, and the other rank's line came between them)
        sys.stdout.write(f"rank {os.environ.get('RANK', '0')}: speeds {json.dumps(speeds)}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
