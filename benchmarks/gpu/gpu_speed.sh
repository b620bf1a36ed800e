#!/usr/bin/env bash
# The GPU speed figures in one prepared run.
#
#   OUT=/tmp/gpu bash benchmarks/gpu/gpu_speed.sh                   # train.py and sweep.py end to end
#   OUT=/tmp/gpu PARTS="suite e2e" bash benchmarks/gpu/gpu_speed.sh  # also the speed suite's model-bound and pipeline runs
#   OUT=/tmp/gpu SMOKE=1 bash benchmarks/gpu/gpu_speed.sh           # the same commands on a CPU, tiny settings
#
# e2e: ResNet-50, bf16, on ImageNet-size JPEGs (500 x 375, benchmarks/gpu/photo_dataset.py),
# each with --decode cpu and --decode gpu: train.py at 224 eager (evaluating at 384 each epoch),
# at 224 compiled, at 128; then sweep.py over 5 sizes of the 224 run. Every epoch line prints
# the data-wait share; benchmarks/gpu/e2e_summary.py tabulates the epochs after the first (steady
# state: after worker start, cuDNN's search and compiling). The loader workers are train.py's
# default (fixres.loaders.worker_count: the cores less one, at most 16).
# suite: benchmarks/speed/speed.py for the model alone (eager and compiled; evaluation and
# fine-tuning at 384; peak memory per batch size), the input pipeline and the loops, then
# `train.py --batch-size auto` for one epoch of the built-in data.
#
# Logs and JSON go to $OUT/gpu_speed/ and are packed into $OUT/gpu_speed.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_ROOT=${OUT:?set OUT to a folder for the logs}
OUT=$OUT_ROOT/gpu_speed
RUNS=${RUNS:-/tmp/fixres-gpu-runs}
PARTS=${PARTS:-e2e}
for part in $PARTS; do  # a part it does not know would run nothing and look like success
  case $part in suite|e2e) ;; *) echo "error: PARTS: unknown part '$part' (known: suite e2e)" >&2; exit 2;; esac
done
export FIXRES_CACHE=${FIXRES_CACHE:-/tmp/fixres-gpu-cache}
mkdir -p "$OUT" "$RUNS"
if [ "${SMOKE:-0}" = 1 ]; then
  MODEL="--device cpu --model test_resnet --res 32 --eval-res 48 --batch-size 16 --steps 2 --precision fp32"
  DATA="--images 64 --images-per-worker 32 --pipeline-repeat 1 --rounds 1 --memory-batches 16"
  TRAIN="--model test_resnet --train-res 32 --cpu --workers 1"
  PHOTOS="--train 96 --val 48 --unique 48"
  E2E="--model test_resnet --cpu --workers 1 --batch-size 16 --epochs 2"
  RES_HIGH=48; RES=32; RES_LOW=24; SIZES="24 32 40 48 56"; SWEEP_BATCH=16
  COMPILE=--no-compile  # the same command, eager: inductor took over 5 minutes on the 2-core CPU VM
else
  MODEL="--model resnet50 --res 224 --eval-res 384 --batch-size 256 --eval-batch-size 512 --steps 20 --precision bf16 --peak-tflops 790"
  DATA="--images 2048 --images-per-worker 384 --pipeline-repeat 3 --rounds 2 --memory-batches 128 256 512 1024"
  TRAIN="--model resnet50 --train-res 224 --mixed-precision bf16"
  PHOTOS="--train 10240 --val 4096 --unique 1280"
  E2E="--model resnet50 --mixed-precision bf16 --batch-size 256 --epochs 3"
  RES_HIGH=384; RES=224; RES_LOW=128; SIZES="160 224 288 320 384"; SWEEP_BATCH=256
  COMPILE=--compile
fi
{ date -u; python -c "import os; print(len(os.sched_getaffinity(0)), 'CPU cores')"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python -c "import torch, torchvision, timm, accelerate, PIL; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'pillow', PIL.__version__)"
  python -c "import torchcodec; print('torchcodec', torchcodec.__version__)" 2>&1 | tail -n 1
  git log -1 --format='code: %h %s' 2>/dev/null
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
step() {  # name, timeout, command...: log to $OUT/name.log, time it, keep going on failure
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? seconds=$(( SECONDS - start ))" | tee -a "$OUT/steps.txt"
  grep -v '^\s*$' "$OUT/$name.log" | grep -E '^(epoch |error|wrote|forward img/s|best:|Traceback|[A-Za-z]*Error)' | tail -n 12
}

if [[ " $PARTS " == *" suite "* ]]; then
  step model 240 python benchmarks/speed/speed.py --parts model --compile $MODEL --out "$OUT/speed-model.json"
  step pipeline-loop 200 python benchmarks/speed/speed.py --parts pipeline,loop $MODEL $DATA --out "$OUT/speed-pipeline-loop.json"
  step batch-auto 120 python train.py $TRAIN --batch-size auto --epochs 1 --output "$RUNS" --name auto
  cp "$RUNS/auto/config.json" "$OUT/auto-config.json" 2>/dev/null
  cp "$RUNS/auto/metrics.jsonl" "$OUT/auto-metrics.jsonl" 2>/dev/null
fi

if [[ " $PARTS " == *" e2e "* ]]; then
  step photos 300 python benchmarks/gpu/photo_dataset.py "$FIXRES_CACHE/photos-500x375" $PHOTOS
  CSV=$FIXRES_CACHE/photos-500x375/labels.csv
  for DECODE in cpu gpu; do
    E="$E2E --data $CSV --decode $DECODE --output $RUNS"
    rm -rf "$RUNS"/e2e-*-"$DECODE"  # run names are reused: start afresh, never resume an older run
    step "train$RES-$DECODE" 240 python train.py $E --train-res $RES --test-res $RES_HIGH --name "e2e-$RES-$DECODE"
    step "train$RES-compiled-$DECODE" 240 python train.py $E --train-res $RES $COMPILE --name "e2e-$RES-compiled-$DECODE"
    step "train$RES_LOW-$DECODE" 240 python train.py $E --train-res $RES_LOW --name "e2e-$RES_LOW-$DECODE"
    step "sweep-$DECODE" 180 python sweep.py --checkpoint "$RUNS/e2e-$RES-$DECODE" --sizes $SIZES --batch-size $SWEEP_BATCH \
      --decode $DECODE $([ "${SMOKE:-0}" = 1 ] && echo --cpu) --output "$RUNS/e2e-sweep-$DECODE"
  done
  python benchmarks/gpu/e2e_summary.py "$RUNS"/e2e-* --out "$OUT/e2e-summary.json" | tee "$OUT/e2e-summary.md"
  for run in "$RUNS"/e2e-*; do
    for f in metrics.jsonl config.json sweep.json; do
      [ -f "$run/$f" ] && cp "$run/$f" "$OUT/$(basename "$run")-$f"
    done
  done
fi
tar czf "$OUT_ROOT/gpu_speed.tar.gz" -C "$OUT_ROOT" gpu_speed
