"""The table of benchmarks/gpu/gpu_speed.sh's end-to-end runs: train.py and sweep.py as a user runs them.

    python benchmarks/gpu/e2e_summary.py /tmp/fixres-gpu-runs/e2e-* --out summary.json

For a train.py run folder: training images/s and the data-wait share (the training loop's
time waiting for its loader) as medians over the epochs after the first (the first holds the
workers' start, cuDNN's algorithm search and any compiling), and evaluation images/s
(validation images over the evaluation's seconds, same epochs). For a sweep.py output folder:
validation images x sizes over the sweep's seconds, and the share of them spent waiting
for the loader.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def train_row(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((run / "config.json").read_text())
    steady = records[1:] or records
    row = {"run": run.name, "job": "train.py", "decode": config.get("decode"), "res": config["train_res"],
           "compile": config.get("compile"), "epochs_used": [r["epoch"] for r in steady],
           "train_images_per_s": statistics.median(r["images_per_s"] for r in steady),
           "data_wait_frac": statistics.median(r.get("data_wait_frac", float("nan")) for r in steady)}
    if all("val_seconds" in r for r in steady):
        row["eval_res"] = config.get("test_res") or config["train_res"]
        row["eval_images_per_s"] = statistics.median(r["val_count"] / r["val_seconds"] for r in steady)
    return row


def sweep_row(folder: Path) -> dict:
    sweep = json.loads((folder / "sweep.json").read_text())
    meta, rows = sweep["meta"], sweep["rows"]
    return {"run": folder.name, "job": "sweep.py", "decode": meta["config"].get("decode"),
            "sizes": [r["size"] for r in rows],
            "image_sizes_per_s": meta["val_images"] * len(rows) / meta["seconds"],
            "images_per_s": meta["val_images"] / meta["seconds"],
            "data_wait_frac": meta["loader_seconds"] / meta["seconds"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = []
    for folder in map(Path, a.folders):
        if (folder / "metrics.jsonl").is_file():
            rows.append(train_row(folder))
        elif (folder / "sweep.json").is_file():
            rows.append(sweep_row(folder))
    print("| run | decode | training img/s | evaluation img/s | data wait |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        if r["job"] == "train.py":
            evaluation = f"{r['eval_images_per_s']:,.0f} at {r['eval_res']}" if "eval_images_per_s" in r else ""
            print(f"| {r['run']} | {r['decode']} | {r['train_images_per_s']:,.0f} at {r['res']}"
                  f"{' compiled' if r['compile'] else ''} | {evaluation} | {100 * r['data_wait_frac']:.0f}% |")
        else:
            print(f"| {r['run']} | {r['decode']} | | {r['images_per_s']:,.0f} images, {r['image_sizes_per_s']:,.0f} "
                  f"image-sizes ({len(r['sizes'])} sizes) | {100 * r['data_wait_frac']:.0f}% |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
