"""Which BatchNorm to adapt where the last block sums two branches that each end in one: the
shortcut's (what fixres adapts today), the main branch's, both or neither, measured.

    python benchmarks/experiments/twin_bn.py runs/s0                               # the quick start's run, 96 and 128 px
    python benchmarks/experiments/twin_bn.py runs/s0 runs/s1 runs/s2 --sizes 96 128 160

The runs are train.py's quick start (no --data: test_resnet, --output-stride 8, the built-in
data). Its last stage is one BasicBlock whose output is relu(bn2(main) + downsample.2(shortcut));
fixres.adapt.find_last_norm picks the shortcut's BN, the last to run, and leaves bn2 as trained.
For each run, test size and choice (none; shortcut = --shortcut; main = --main; both), the chosen
BatchNorms' running statistics are re-estimated at that size on every training image with the
test preprocessing, as finetune.py --method bn-stats re-estimates its one layer
(fixres.methods.reestimate_last_bn, its defaults: batch 64, seed 0); "both" in one pass, right
for parallel branches. Each is then evaluated on the run's whole validation split at that size
(fixres.sweep.run_sweep) and compared with the shortcut choice on the same images: the paired
difference in top-1 and its 95% interval (fixres.stats). Prints a markdown table for
docs/benchmarks.md; with several runs, also each choice's mean difference over the runs.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fixres.adapt import find_last_norm, is_batchnorm  # noqa: E402
from fixres.cli import run_main  # noqa: E402
from fixres.config import FinetuneConfig, SweepConfig  # noqa: E402
from fixres.loaders import worker_count  # noqa: E402
from fixres.methods import reestimate_last_bn  # noqa: E402
from fixres.runtime import make_accelerator  # noqa: E402
from fixres.stats import METHOD as STATS_METHOD  # noqa: E402
from fixres.stats import paired_difference_of  # noqa: E402
from fixres.sweep import load_for_sweep, run_sweep  # noqa: E402
from fixres.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

REFERENCE = "shortcut"  # what fixres adapts today


def choices(shortcut: str, main: str) -> dict[str, list[str]]:
    return {"none": [], "shortcut": [shortcut], "main": [main], "both": [main, shortcut]}


def measure_run(run: str, a, accelerator) -> list[dict]:
    """One row per (size, choice) of `run`: top1, loss, and the paired difference against REFERENCE."""
    model, meta, split, _, _ = load_for_sweep(SweepConfig(checkpoint=run), accelerator)
    for option, name in (("--shortcut", a.shortcut), ("--main", a.main)):
        layer = dict(model.named_modules()).get(name)
        if not is_batchnorm(layer):
            sys.exit(f"{option} {name}: {run}'s {meta['model']} has no BatchNorm of that name")
    last = find_last_norm(model, input_size=int(meta["train_res"]))
    print(f"{run}: {meta['model']}, trained at {meta['train_res']} px; fixres adapts {last}", file=sys.stderr)
    # finetune.py --method bn-stats's settings, with the run's preprocessing as its weights record it
    cfg = FinetuneConfig(checkpoint=run, crop_pct=meta.get("crop_pct", 0.875),
                         interpolation=meta.get("interpolation", "bilinear"),
                         mean=list(meta.get("mean", IMAGENET_MEAN)), std=list(meta.get("std", IMAGENET_STD)))
    workers = worker_count(a.workers)
    rows = []
    for size in a.sizes:
        by_choice = {}
        for choice, layers in choices(a.shortcut, a.main).items():
            trial = copy.deepcopy(model).to(accelerator.device)
            if layers:
                reestimate_last_bn(trial, split.train, size, cfg, accelerator, workers, layers)
            by_choice[choice] = run_sweep(trial, meta, split, [size], cfg.crop_pct, accelerator, workers=workers,
                                          decode="cpu")[0]
            print(f"  {size} px, {choice}: top-1 {100 * by_choice[choice]['top1']:.2f}%", file=sys.stderr, flush=True)
        reference = by_choice[REFERENCE]["per_image_correct"]
        for choice, row in by_choice.items():
            rows.append({"run": Path(run).name, "size": size, "choice": choice, "top1": row["top1"], "loss": row["loss"],
                         **paired_difference_of(row["per_image_correct"], reference)})
    return rows


def table(rows: list[dict], a) -> str:
    layers = {"none": "as trained", "shortcut": a.shortcut, "main": a.main, "both": f"{a.main} + {a.shortcut}"}
    lines = ["| run | size | re-estimated | top-1 | loss | vs shortcut (95% CI), points | gained / lost |",
             "|---|---:|---|---:|---:|---|---:|"]
    for r in rows:
        diff = ("reference" if r["choice"] == REFERENCE else
                f"{100 * r['diff']:+.2f} [{100 * r['low']:+.2f}, {100 * r['high']:+.2f}]")
        lines.append(f"| {r['run']} | {r['size']} | {r['choice']} ({layers[r['choice']]}) | {100 * r['top1']:.2f}% | "
                     f"{r['loss']:.4f} | {diff} | {r['gained']} / {r['lost']} |")
    return "\n".join(lines)


def across_runs(rows: list[dict]) -> str:
    lines = ["| size | re-estimated | mean top-1 | mean vs shortcut, points | runs above / below shortcut |",
             "|---:|---|---:|---:|---:|"]
    for size in dict.fromkeys(r["size"] for r in rows):
        for choice in dict.fromkeys(r["choice"] for r in rows):
            group = [r for r in rows if r["size"] == size and r["choice"] == choice]
            above, below = sum(r["diff"] > 0 for r in group), sum(r["diff"] < 0 for r in group)
            lines.append(f"| {size} | {choice} | {100 * statistics.mean(r['top1'] for r in group):.2f}% | "
                         f"{100 * statistics.mean(r['diff'] for r in group):+.2f} | {above} / {below} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="train.py run folders (the quick start's)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128], help="test sizes (default: %(default)s)")
    parser.add_argument("--shortcut", default="layer4.0.downsample.2",
                        help="the shortcut branch's last BatchNorm (default: %(default)s)")
    parser.add_argument("--main", default="layer4.0.bn2", help="the main branch's last BatchNorm (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: fixres's worker_count)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    a = parser.parse_args(argv)
    if any(s <= 0 for s in a.sizes):
        parser.error(f"--sizes must all be > 0, got {a.sizes}")
    if a.workers is not None and a.workers < 0:
        parser.error(f"--workers must be >= 0, got {a.workers}")
    accelerator = make_accelerator(SweepConfig(cpu=a.cpu))
    rows = [row for run in a.runs for row in measure_run(run, a, accelerator)]
    print(f"Top-1 and loss on each run's whole validation split, the chosen BatchNorms' statistics re-estimated at "
          f"each size on every training image (test preprocessing, batch 64, as finetune.py --method bn-stats). "
          f"vs shortcut: the paired difference on the same images; {STATS_METHOD}.\n")
    print(table(rows, a))
    if len(a.runs) > 1:
        print("\nAcross runs:\n")
        print(across_runs(rows))


if __name__ == "__main__":
    sys.exit(run_main(main))  # a run folder that is not one: a one-line error
