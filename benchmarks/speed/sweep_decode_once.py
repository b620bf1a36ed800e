"""Benchmark: a decode-once sweep over 5 test sizes against 5 single-size evaluations.

    python benchmarks/speed/sweep_decode_once.py      # 300 val JPEGs of 800x600 (Cassava's size), test_resnet
    python benchmarks/speed/sweep_decode_once.py --workers 0 --width 500 --height 375   # everything on one core

(a) `fixres.sweep.run_sweep` over all sizes: each image decoded once, resized to every size;
(b) what one would do without it: train.py's evaluation (`ImageDataset` + `eval_transform` +
    `fixres.engine.evaluate`) once per size, decoding every image again each time;
(c) `run_sweep` once per size: the sweep's own pipeline, but decoding again per size, so
    that (a)/(c) is the gain of decoding once and nothing else.
Same data, model, process, threads and batch size; the three are interleaved `--repeats`
times after a warm-up, and the medians compared; (a) and (b) must give the same top-1 at
every size. Also times the parts (decode, resize per size, forward per size) once, to say
where the time goes. Prints a table and writes JSON (--json).

Defaults: one loader worker and one torch thread, the two cores of our CPU machine, so the
model runs beside the decoding as it does beside an accelerator; one thread because on a
shared 2-core machine two OpenMP threads stall each other (see docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate import Accelerator  # noqa: E402

from fixres.data import load_split  # noqa: E402
from fixres.engine import evaluate  # noqa: E402
from fixres.images import open_image  # noqa: E402
from fixres.loaders import ImageDataset, collate_skipping  # noqa: E402
from fixres.models import create_model  # noqa: E402
from fixres.shapes import generate  # noqa: E402
from fixres.sweep import run_sweep  # noqa: E402
from fixres.transforms import eval_transform  # noqa: E402


def separate_evaluations(model, split, sizes, crop_pct, accelerator, batch_size, workers) -> list[dict]:
    results = []
    for size in sizes:
        loader = torch.utils.data.DataLoader(ImageDataset(split.val, eval_transform(size=size, crop_pct=crop_pct)),
                                             batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping)
        results.append({"size": size, **evaluate(model, loader, accelerator, channels_last=True)})
    return results


@torch.inference_mode()
def breakdown(model, split, sizes, crop_pct, batch_size) -> dict:
    """Seconds spent decoding all images once, and resizing / running the model per size."""
    paths = [p for p, _ in split.val]
    t0 = time.perf_counter()
    images = [open_image(p) for p in paths]
    decode = time.perf_counter() - t0
    resize, forward = {}, {}
    for size in sizes:
        tf = eval_transform(size=size, crop_pct=crop_pct)
        t0 = time.perf_counter()
        tensors = [tf(img) for img in images]
        resize[size] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(0, len(tensors), batch_size):
            model(torch.stack(tensors[i:i + batch_size]).contiguous(memory_format=torch.channels_last))
        forward[size] = time.perf_counter() - t0
    return {"decode_once": decode, "resize": resize, "forward": forward}


def sweep_options(doc: str, *, n_val: int, width: int, height: int, json_path: str) -> argparse.ArgumentParser:
    """The options of the sweep benchmarks (this one and sweep_crop_pcts.py): generated data, model, sizes,
    batch, loader workers, torch threads, rounds, where the JSON goes."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="generated once, then reused (default: runs/bench/shapes-WxH-N)")
    p.add_argument("--n-val", type=int, default=n_val)
    p.add_argument("--width", type=int, default=width)
    p.add_argument("--height", type=int, default=height)
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 80, 96, 112, 128])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="loader workers (0: all work on the timed process)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=json_path)
    return p


def write_result(result: dict, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def main(argv=None) -> dict:
    p = sweep_options(__doc__, n_val=300, width=800, height=600, json_path="benchmarks/speed/results/sweep_decode_once.json")
    p.add_argument("--crop-pct", type=float, default=0.875)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data_dir = args.data_dir or f"runs/bench/shapes-{args.width}x{args.height}-{args.n_val}"
    csv = generate(Path(data_dir), n_train=6, n_val=args.n_val, width=args.width, height=args.height)
    split = load_split(csv)
    torch.manual_seed(0)
    model = create_model(args.model, len(split.classes)).eval().to(memory_format=torch.channels_last)
    meta = {"interpolation": "bilinear"}
    accelerator = Accelerator(cpu=True)
    sweep = lambda: run_sweep(model, meta, split, args.sizes, args.crop_pct, accelerator,  # noqa: E731
                              batch_size=args.batch_size, workers=args.workers)
    separate = lambda: separate_evaluations(model, split, args.sizes, args.crop_pct,  # noqa: E731
                                            accelerator, args.batch_size, args.workers)

    rows, refs = sweep(), separate()  # warm-up: page cache, allocator, oneDNN kernels
    for row, ref in zip(rows, refs):
        assert row["count"] == ref["count"] and row["top1"] == ref["accuracy"], (row, ref)
    per_size = lambda: [run_sweep(model, meta, split, [size], args.crop_pct, accelerator,  # noqa: E731
                                  batch_size=args.batch_size, workers=args.workers) for size in args.sizes]
    times = {"sweep": [], "separate": [], "per_size_sweeps": []}
    for _ in range(args.repeats):
        for name, fn in (("sweep", sweep), ("separate", separate), ("per_size_sweeps", per_size)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    parts = breakdown(model, split, args.sizes, args.crop_pct, args.batch_size)

    sweep_s, separate_s, per_size_s = (statistics.median(times[k]) for k in ("sweep", "separate", "per_size_sweeps"))
    result = {
        "ratio": sweep_s / separate_s, "ratio_decode_once_only": sweep_s / per_size_s,
        "sweep_seconds": sweep_s, "separate_seconds": separate_s, "per_size_sweeps_seconds": per_size_s,
        "runs": times, "parts": parts, "sizes": args.sizes, "images": len(split.val),
        "stored": f"{args.width}x{args.height}", "model": args.model, "batch_size": args.batch_size,
        "workers": args.workers, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
        "command": "python benchmarks/speed/sweep_decode_once.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"{len(split.val)} val images stored at {args.width}x{args.height}, {args.model}, sizes {args.sizes}, "
          f"batch {args.batch_size}, workers {args.workers}, {result['threads']} thread(s), torch {torch.__version__}")
    print(f"{'':32}{'median s':>10}  runs")
    print(f"{'(a) decode-once sweep, 5 sizes':32}{sweep_s:10.2f}  {' '.join(f'{t:.2f}' for t in times['sweep'])}")
    print(f"{'(b) 5 single-size evaluations':32}{separate_s:10.2f}  {' '.join(f'{t:.2f}' for t in times['separate'])}")
    print(f"{'(c) 5 single-size sweeps':32}{per_size_s:10.2f}  {' '.join(f'{t:.2f}' for t in times['per_size_sweeps'])}")
    print(f"ratio (a)/(b): {result['ratio']:.3f}    (a)/(c), decode-once alone: {result['ratio_decode_once_only']:.3f}")
    print(f"where the time goes: decode {parts['decode_once']:.2f} s per pass over the images; "
          f"resize {sum(parts['resize'].values()):.2f} s and forward {sum(parts['forward'].values()):.2f} s "
          f"summed over the sizes")
    write_result(result, args.json)
    return result


if __name__ == "__main__":
    main()
