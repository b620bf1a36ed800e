#!/usr/bin/env bash
# Issue 6's GPU figures in one run: benchmarks/speed.py for ResNet-50 at 224 in bf16 (model
# alone, eager and compiled; evaluation and fine-tuning at 384; peak memory per batch size;
# the input pipeline on all cores; train.py's loop against the plain loop), then
# `train.py --batch-size auto` for one epoch of the built-in data.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_speed.sh       # SMOKE=1: the same on a CPU, tiny settings
#
# Logs and JSON go to $OUT/gpu_speed/ and are packed into $OUT/gpu_speed.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_ROOT=${OUT:?set OUT to a folder for the logs}
OUT=$OUT_ROOT/gpu_speed
export FIXRES_CACHE=${FIXRES_CACHE:-/tmp/fixres-gpu-cache}
mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then
  MODEL="--device cpu --model test_resnet --res 32 --eval-res 48 --batch-size 16 --steps 2 --precision fp32"
  DATA="--images 64 --images-per-worker 32 --pipeline-repeat 1 --rounds 1 --memory-batches 16"
  TRAIN="--model test_resnet --train-res 32 --cpu --workers 1"
else
  MODEL="--model resnet50 --res 224 --eval-res 384 --batch-size 256 --eval-batch-size 512 --steps 20 --precision bf16 --peak-tflops 790"
  DATA="--images 2048 --images-per-worker 384 --pipeline-repeat 3 --rounds 2 --memory-batches 128 256 512 1024"
  TRAIN="--model resnet50 --train-res 224 --mixed-precision bf16"
fi
{ date -u; nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python -c "import torch, torchvision, timm, accelerate, PIL; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'pillow', PIL.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
step() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? seconds=$(( SECONDS - start ))" | tee -a "$OUT/steps.txt"
  grep -v '^\s*$' "$OUT/$name.log" | tail -n 30
}
step model 240 python benchmarks/speed.py --parts model --compile $MODEL --out "$OUT/speed-model.json"
step pipeline-loop 200 python benchmarks/speed.py --parts pipeline,loop $MODEL $DATA --out "$OUT/speed-pipeline-loop.json"
step batch-auto 120 python train.py $TRAIN --batch-size auto --epochs 1 --output /tmp/fixres-gpu-runs --name auto
cp /tmp/fixres-gpu-runs/auto/config.json "$OUT/auto-config.json" 2>/dev/null
cp /tmp/fixres-gpu-runs/auto/metrics.jsonl "$OUT/auto-metrics.jsonl" 2>/dev/null
tar czf "$OUT_ROOT/gpu_speed.tar.gz" -C "$OUT_ROOT" gpu_speed
