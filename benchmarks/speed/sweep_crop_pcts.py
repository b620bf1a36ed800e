"""Benchmark: a crop_pct sweep (every (size, crop_pct) pair from one decode) against separate runs.

    python benchmarks/speed/sweep_crop_pcts.py      # 200 val JPEGs of 500x375, 5 sizes x 3 crop_pcts, test_resnet

(a) `run_sweep(..., crop_pcts=...)`: sweep.py --crop-pcts, each image decoded once for all 15 pairs;
(b) `run_sweep` once per crop_pct: sweep.py --crop-pct X run 3 times, each image decoded 3 times;
(c) `run_sweep` once per (size, crop_pct) pair: 15 separate runs, each image decoded 15 times.
Decodes are counted in a first pass with no loader workers (fixres.loaders.open_image wrapped),
which also checks that (a) equals (c) image for image at every pair; then the three are timed
in turns, `--repeats` times, with the default one loader worker and one torch thread (the
two cores of our CPU machine, as benchmarks/speed/sweep_decode_once.py), and the medians compared.
Also times, once, a decode and a Resize + CenterCrop per pair, to say where the time goes.
Prints a table and writes JSON (--json).
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate import Accelerator  # noqa: E402

from fixres import loaders as loaders_lib  # noqa: E402
from fixres.data import load_split  # noqa: E402
from fixres.images import open_image  # noqa: E402
from fixres.models import create_model  # noqa: E402
from fixres.shapes import generate  # noqa: E402
from fixres.sweep import run_sweep  # noqa: E402
from fixres.transforms import eval_transform  # noqa: E402
from sweep_decode_once import sweep_options, write_result  # noqa: E402  (a sibling: benchmarks/speed/ is on the path)


def ways(model, split, sizes, crops, accelerator, *, batch_size, workers) -> dict:
    """name -> a function running that way of evaluating every pair, returning all its rows."""
    meta = {"interpolation": "bilinear"}
    sweep = lambda sizes, crop, crop_pcts=None: run_sweep(  # noqa: E731
        model, meta, split, sizes, crop, accelerator, crop_pcts=crop_pcts, batch_size=batch_size, workers=workers)
    return {"crop_pct_sweep": lambda: sweep(sizes, crops[0], crops),
            "per_crop_pct_sweeps": lambda: [r for c in crops for r in sweep(sizes, c)],
            "per_pair_runs": lambda: [r for s in sizes for c in crops for r in sweep([s], c)]}


def count_decodes(run) -> tuple[int, list[dict]]:
    """(the images the run decoded, its rows); run in this process (no loader workers)."""
    real, calls = loaders_lib.open_image, [0]  # the name the datasets look up

    def counting(path):
        calls[0] += 1
        return real(path)
    loaders_lib.open_image = counting
    try:
        rows = run()
    finally:
        loaders_lib.open_image = real
    return calls[0], rows


def decode_and_resize_ms(split, sizes, crops) -> dict:
    """Milliseconds per image: one decode, and one Resize + CenterCrop per pair (this process)."""
    paths = [p for p, _ in split.val]
    t0 = time.perf_counter()
    images = [open_image(p) for p in paths]
    decode = time.perf_counter() - t0
    per_pair = [eval_transform(size=s, crop_pct=c, normalize=False) for s in sizes for c in crops]
    t0 = time.perf_counter()
    for img in images:
        for transform in per_pair:
            transform(img)
    resize = time.perf_counter() - t0
    return {"decode_ms": 1000 * decode / len(paths), "resize_ms_per_pair": 1000 * resize / len(paths) / len(per_pair)}


def main(argv=None) -> dict:
    p = sweep_options(__doc__, n_val=200, width=500, height=375, json_path="benchmarks/speed/results/sweep_crop_pcts.json")
    p.add_argument("--crop-pcts", type=float, nargs="+", default=[0.875, 0.95, 1.0])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    crops = sorted(set(args.crop_pcts))

    data_dir = args.data_dir or f"runs/bench/shapes-{args.width}x{args.height}-{args.n_val}"
    split = load_split(generate(Path(data_dir), n_train=6, n_val=args.n_val, width=args.width, height=args.height))
    torch.manual_seed(0)
    model = create_model(args.model, len(split.classes)).eval().to(memory_format=torch.channels_last)
    accelerator = Accelerator(cpu=True)
    counted = ways(model, split, args.sizes, crops, accelerator, batch_size=args.batch_size, workers=0)
    decodes, rows = {}, {}
    for name, run in counted.items():  # also the warm-up: page cache, allocator, oneDNN kernels
        decodes[name], rows[name] = count_decodes(run)
    for a, c in zip(rows["crop_pct_sweep"], rows["per_pair_runs"], strict=True):
        assert (a["size"], a["crop_pct"]) == (c["size"], c["crop_pct"])
        assert torch.equal(a["per_image_correct"], c["per_image_correct"]) and abs(a["loss"] - c["loss"]) < 1e-6

    timed = ways(model, split, args.sizes, crops, accelerator, batch_size=args.batch_size, workers=args.workers)
    times = {name: [] for name in timed}
    for _ in range(args.repeats):
        for name, run in timed.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(t) for name, t in times.items()}
    parts = decode_and_resize_ms(split, args.sizes, crops)
    pairs = len(args.sizes) * len(crops)
    result = {
        "decodes": decodes, "median_seconds": median, "runs": times, "parts": parts, "pairs": pairs, "sizes": args.sizes,
        "crop_pcts": crops, "images": len(split.val), "stored": f"{args.width}x{args.height}", "model": args.model,
        "batch_size": args.batch_size, "workers": args.workers, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "command": "python benchmarks/speed/sweep_crop_pcts.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"{len(split.val)} val images stored at {args.width}x{args.height}, {args.model}, sizes {args.sizes} x "
          f"crop_pcts {crops} ({pairs} pairs), batch {args.batch_size}, workers {args.workers}, "
          f"{result['threads']} thread(s), torch {torch.__version__}")
    print(f"{'':38}{'decodes':>9}{'median s':>10}  runs")
    labels = {"crop_pct_sweep": f"(a) one crop_pct sweep, {pairs} pairs", "per_crop_pct_sweeps":
              f"(b) {len(crops)} sweeps, one per crop_pct", "per_pair_runs": f"(c) {pairs} runs, one per pair"}
    for name, label in labels.items():
        print(f"{label:38}{decodes[name]:9d}{median[name]:10.2f}  {' '.join(f'{t:.2f}' for t in times[name])}")
    print(f"(a)/(b) {median['crop_pct_sweep'] / median['per_crop_pct_sweeps']:.3f}   "
          f"(a)/(c) {median['crop_pct_sweep'] / median['per_pair_runs']:.3f}   (a) = (c) image for image at every pair")
    print(f"per image: a decode {parts['decode_ms']:.2f} ms, a Resize + CenterCrop {parts['resize_ms_per_pair']:.2f} ms "
          f"per pair")
    write_result(result, args.json)
    return result


if __name__ == "__main__":
    main()
