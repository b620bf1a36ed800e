"""The CPU time of a short script run, with the garbage collector as train.py, sweep.py and
finetune.py set it (off for their imports; back on in run_main, with what was imported frozen)
against the collector on throughout, as Python leaves it.

Both are real interpreters of the same scripts, taking turns (A B A B ...) so that drift in the
machine's speed hits both alike; "on throughout" runs the script through runpy with gc.disable
made a no-op, so its run_main finds the collector on and leaves it. The CPU time is the child's
user + system time (resource.getrusage).

    python benchmarks/speed/script_start_gc.py                 # 5 rounds: --help, a tiny train, sweep and finetune
    python benchmarks/speed/script_start_gc.py --rounds 9

Prints a table and writes benchmarks/speed/results/script_start_gc.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results" / "script_start_gc.json"
# the collector left on: gc.disable() is a no-op, so the script imports with it on and run_main leaves it on
COLLECTOR_ON = ("import gc, runpy, sys; gc.disable = lambda: None; sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
TINY = ["--model", "test_resnet", "--train-res", "32", "--batch-size", "16", "--workers", "0", "--cpu"]


def tiny_data(root: Path) -> Path:
    """60 training and 20 validation images of 48 px, 4 classes, as labels.csv."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = ["image_id,label,is_val"]
    for i in range(80):
        pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.jpg")
        rows.append(f"{i:03d}.jpg,c{i % 4},{i >= 60}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def cpu_seconds(argv: list[str]) -> float:
    """The user + system seconds of `argv`, a new interpreter run to the end (checked)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="script_start_gc-"))
    data = tiny_data(work / "data")
    subprocess.run([sys.executable, "train.py", "--data", data, *TINY, "--epochs", "1", "--output", work,
                    "--name", "source"], cwd=ROOT, check=True, capture_output=True)  # for sweep and finetune
    source = work / "source"
    def cases(i: int) -> dict[str, list[str]]:  # each run writes a folder of its own (i)
        return {
            "train.py --help": ["train.py", "--help"],
            "train.py, 2 epochs": ["train.py", "--data", str(data), *TINY, "--epochs", "2", "--output", str(work),
                                   "--name", f"train-{i}"],
            "sweep.py, 3 sizes": ["sweep.py", "--checkpoint", str(source), "--sizes", "24", "32", "40",
                                  "--batch-size", "16", "--workers", "0", "--cpu", "--output", str(work / f"sweep-{i}")],
            "finetune.py, 1 epoch": ["finetune.py", "--checkpoint", str(source), "--res", "40", "--epochs", "1",
                                     "--batch-size", "16", "--workers", "0", "--cpu", "--output", str(work),
                                     "--name", f"finetune-{i}"],
        }
    seconds = {case: {"as the scripts set it": [], "on throughout": []} for case in cases(0)}
    for i in range(args.rounds):
        for case, argv in cases(2 * i).items():
            seconds[case]["as the scripts set it"].append(cpu_seconds([sys.executable, *argv]))
        for case, argv in cases(2 * i + 1).items():
            seconds[case]["on throughout"].append(cpu_seconds([sys.executable, "-c", COLLECTOR_ON, *argv]))
    rows = []
    print(f"{'run':<22} {'collector on':>13} {'as the scripts':>15} {'ratio':>6}   (median CPU s of {args.rounds})")
    for case, by in seconds.items():
        on, ours = statistics.median(by["on throughout"]), statistics.median(by["as the scripts set it"])
        pairs = [a / b for a, b in zip(by["as the scripts set it"], by["on throughout"])]
        rows.append({"run": case, "collector_on_s": round(on, 2), "as_scripts_s": round(ours, 2),
                     "ratio_median_of_pairs": round(statistics.median(pairs), 3),
                     "ratio_range": [round(min(pairs), 3), round(max(pairs), 3)], "seconds": by})
        print(f"{case:<22} {on:>13.2f} {ours:>15.2f} {statistics.median(pairs):>6.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                                   "rounds": args.rounds, "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
