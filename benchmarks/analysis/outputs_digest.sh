#!/usr/bin/env bash
# Same outputs before and after a change that should not change them (a refactor): run a short quick
# start, a sweep, a fine-tune of each method, and a ViT's train and fine-tune with the code in CODE
# (a checkout), and write to OUT/digest.txt the sha256 of every weights file and of each --help, and
# every JSON record with its timings removed. Two checkouts' digests are then compared:
#
#   git worktree add /tmp/before <commit>; git worktree add /tmp/after HEAD
#   benchmarks/analysis/outputs_digest.sh /tmp/before out-before    # about 20 min each on 2 shared CPU cores
#   benchmarks/analysis/outputs_digest.sh /tmp/after out-after
#   diff out-before/digest.txt out-after/digest.txt
#
# state.pt (optimizer and loop state) also holds each epoch's timings, so its hash differs run to run;
# sweep.csv holds timing columns likewise: compare those by their other columns.
set -euo pipefail
code=$(realpath "$1"); out=$(realpath -m "$2"); mkdir -p "$out"; cd "$out"
export OMP_NUM_THREADS=1 PYTHONHASHSEED=0  # FIXRES_CACHE: where the built-in data is (generated once)
for s in train sweep finetune; do python "$code/$s.py" --help > help-$s.txt; done
python "$code/train.py" --epochs 2 --output runs --name q > train.log 2>&1
python "$code/sweep.py" --checkpoint runs/q --no-speed --output sweep-q > sweep.log 2>&1
for m in finetune bn-stats parametric; do
  python "$code/finetune.py" --checkpoint runs/q --method $m --epochs 2 --output runs --name ft-$m > ft-$m.log 2>&1
done
python "$code/finetune.py" --checkpoint runs/q --res 80 --epochs 1 --output runs --name ft-80 > ft-80.log 2>&1
python "$code/train.py" --recipe shapes-vit --epochs 1 --output runs --name vit > vit.log 2>&1
python "$code/finetune.py" --checkpoint runs/vit --res 80 --epochs 1 --output runs --name ft-vit > ft-vit.log 2>&1
python - <<'PY' > digest.txt
import hashlib, json, pathlib, csv
TIMING = {"seconds", "val_seconds", "images_per_s", "data_wait_frac", "time", "started", "elapsed", "wall_s"}
def clean(o):
    if isinstance(o, dict): return {k: clean(v) for k, v in o.items() if k not in TIMING and "second" not in k and "time" not in k}
    if isinstance(o, list): return [clean(v) for v in o]
    return o
for p in sorted(pathlib.Path(".").rglob("*")):
    if not p.is_file() or p.suffix in (".log", ".png"): continue
    if p.name == "digest.txt": continue
    if p.suffix in (".safetensors", ".bin", ".pth"):
        print(p, hashlib.sha256(p.read_bytes()).hexdigest()); continue
    if p.suffix == ".jsonl":
        for i, line in enumerate(p.read_text().splitlines()): print(p, i, json.dumps(clean(json.loads(line)), sort_keys=True))
    elif p.suffix == ".json":
        print(p, json.dumps(clean(json.loads(p.read_text())), sort_keys=True))
    else:
        print(p, hashlib.sha256(p.read_bytes()).hexdigest())
PY
echo done
