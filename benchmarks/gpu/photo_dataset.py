"""A CSV dataset of ImageNet-size JPEGs for end-to-end speed runs, made in seconds.

    python benchmarks/gpu/photo_dataset.py /tmp/photos --train 10240 --val 4096 --unique 1280
    # -> /tmp/photos/labels.csv (printed): 10,240 training and 4,096 validation rows

The built-in dataset's generator (fixres.shapes.generate, 500 x 375, quality 90, as
benchmarks/speed/speed.py uses) draws about 25 images per second per core, so `--unique` images
are drawn in parallel shards (one seed each) and the rows beyond them are hard links to
those files under other names: every row is a real file that a loader opens and decodes,
and a speed run needs the decoding work, not distinct pictures.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fixres.shapes import generate  # noqa: E402


def shard(args) -> Path:
    root, seed, n_train, n_val = args
    return generate(root, n_train=n_train, n_val=n_val, width=500, height=375, quality=90, seed=seed)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--train", type=int, default=10240, help="training rows")
    p.add_argument("--val", type=int, default=4096, help="validation rows")
    p.add_argument("--unique", type=int, default=1280, help="distinct JPEGs drawn (training and validation)")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    a = p.parse_args(argv)
    out = Path(a.out)
    csv_path = out / "labels.csv"
    if csv_path.exists():
        print(csv_path)
        return csv_path
    shards = max(1, min(a.jobs, a.unique // 16))
    unique_val = max(shards, a.unique * a.val // (a.train + a.val))
    jobs = [(out / "shards" / f"s{k}", k, (a.unique - unique_val) // shards, unique_val // shards) for k in range(shards)]
    with ProcessPoolExecutor(max_workers=a.jobs) as pool:
        csvs = list(pool.map(shard, jobs))
    pools = {"False": [], "True": []}  # is_val -> [(file, label)]
    for shard_csv in csvs:
        with open(shard_csv) as f:
            for row in csv.DictReader(f):
                pools[row["is_val"]].append((shard_csv.parent / "images" / row["image_id"], row["label"]))
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for is_val, n in (("False", a.train), ("True", a.val)):
        files = pools[is_val]
        for i in range(n):
            source, label = files[i % len(files)]
            name = f"{'v' if is_val == 'True' else 't'}{i:06d}.jpg"
            target = out / "images" / name
            if not target.exists():
                os.link(source, target)
            rows.append(f"{name},{label},{is_val}")
    tmp = out / "labels.csv.tmp"
    tmp.write_text("image_id,label,is_val\n" + "\n".join(rows) + "\n")
    tmp.rename(csv_path)
    print(csv_path)
    return csv_path


if __name__ == "__main__":
    main()
