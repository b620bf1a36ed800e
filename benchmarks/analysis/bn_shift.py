"""Is a fall in accuracy above the training size the body's BatchNorm statistics? A diagnostic.

    python benchmarks/analysis/bn_shift.py runs/cnx-s0 --sizes 64 72 80 96 128

For each test size, a trained run's model is evaluated on its whole validation split three ways:
as trained (the sweep's number), with its last BatchNorm's running statistics re-estimated at
that size (finetune.py --method bn-stats), and with every BatchNorm's re-estimated there, one
after the other in the order they run (fixres.methods.reestimate_last_bn, one pass over the
training images with the test preprocessing per BatchNorm, each seeing the ones before it already
re-estimated: one pass for all would give each BatchNorm the inputs of the old statistics
upstream). If re-estimating every
BatchNorm recovers what the larger size loses and the last alone does not, the loss comes from
the statistics of layers FixRes's fine-tuning leaves frozen. Paired differences against the model
as trained at the same size, with 95% intervals (fixres.stats). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

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


def in_running_order(model, names: list[str], size: int) -> list[str]:
    """`names` in the order a forward pass reaches them."""
    order, modules = [], dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, args, n=n: order.append(n)) for n in names]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order)) + [n for n in names if n not in order]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a train.py run folder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 72, 80, 96, 128], help="test sizes")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: fixres's worker_count)")
    a = parser.parse_args(argv)
    accelerator = make_accelerator(SweepConfig(cpu=True))
    model, meta, split, _, _ = load_for_sweep(SweepConfig(checkpoint=a.run), accelerator)
    every_bn = in_running_order(model, [name for name, module in model.named_modules() if is_batchnorm(module)],
                                int(meta["train_res"]))
    if not every_bn:
        sys.exit(f"{a.run}: {meta['model']} has no BatchNorm")
    last = find_last_norm(model, input_size=int(meta["train_res"]))
    cfg = FinetuneConfig(checkpoint=a.run, crop_pct=meta.get("crop_pct", 0.875),
                         interpolation=meta.get("interpolation", "bilinear"),
                         mean=list(meta.get("mean", IMAGENET_MEAN)), std=list(meta.get("std", IMAGENET_STD)))
    workers = worker_count(a.workers)
    print(f"{a.run}: {meta['model']} trained at {meta['train_res']} px; {len(every_bn)} BatchNorms, the last "
          f"{last}. Whole validation split ({len(split.val)} images); vs trained: paired, {STATS_METHOD}.\n")
    print("| size | as trained | last BN re-estimated | vs as trained | every BN re-estimated | vs as trained |")
    print("|---:|---:|---:|---|---:|---|")
    for size in a.sizes:
        rows = {}
        for choice, layers in (("trained", []), ("last", [last]), ("every", every_bn)):
            trial = copy.deepcopy(model)
            for layer in layers:  # in the order they run: each sees the ones before it re-estimated
                reestimate_last_bn(trial, split.train, size, cfg, accelerator, workers, layer)
            rows[choice] = run_sweep(trial, meta, split, [size], cfg.crop_pct, accelerator, workers=workers,
                                     decode="cpu")[0]

        def versus(choice: str) -> str:
            d = paired_difference_of(rows[choice]["per_image_correct"], rows["trained"]["per_image_correct"])
            return f"{100 * d['diff']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
        print(f"| {size} | {100 * rows['trained']['top1']:.2f}% | {100 * rows['last']['top1']:.2f}% | {versus('last')} "
              f"| {100 * rows['every']['top1']:.2f}% | {versus('every')} |", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
