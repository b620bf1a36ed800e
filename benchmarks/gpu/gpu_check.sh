#!/usr/bin/env bash
# The GPU checks of the three scripts in one short run: train.py (ResNet-50, 224, bf16,
# Accelerate) on the built-in data, sweep.py of the result, finetune.py at 384.
#
#   OUT=/tmp/gpu bash benchmarks/gpu/gpu_check.sh          # small: SMOKE=1 for a CPU dry run
#
# Run folders go to $RUNS (default /tmp/fixres-gpu-runs; ResNet-50 checkpoints are large);
# logs, metrics and tables to $OUT/gpu_check/, packed into $OUT/gpu_check.tar.gz as well
# (the device tool returns only a few files).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_ROOT=${OUT:?set OUT to a folder for the logs}
OUT=$OUT_ROOT/gpu_check
RUNS=${RUNS:-/tmp/fixres-gpu-runs}
export FIXRES_CACHE=${FIXRES_CACHE:-/tmp/fixres-gpu-cache}
mkdir -p "$OUT" "$RUNS"
WORKERS=$(( $(nproc) - 2 )); [ "$WORKERS" -gt 12 ] && WORKERS=12
if [ "${SMOKE:-0}" = 1 ]; then  # CPU dry run of the same commands with a tiny model
  MODEL="--model test_resnet"; TRAIN="--train-res 32 --epochs 1 --batch-size 64"; FT="--res 48 --epochs 1"
  SIZES="32 48"; LAUNCH="python"; DEVICE="--cpu"; WORKERS=1
else
  MODEL="--model resnet50"; TRAIN="--train-res 224 --epochs 3 --batch-size 256 --lr 2e-3"; FT="--res 384 --epochs 2"
  SIZES="160 224 288 320 384"; LAUNCH="accelerate launch --num_processes 1 --num_machines 1 --dynamo_backend no --mixed_precision bf16"; DEVICE=""
fi
{
  date -u; nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python -c "import torch, torchvision, timm, accelerate; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
step() {  # name, timeout, command...: log to $OUT/name.log, time it, keep going on failure
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( SECONDS - start ))" | tee -a "$OUT/steps.txt"
  tail -n 25 "$OUT/$name.log"
}
step train 240 $LAUNCH train.py $MODEL $TRAIN $DEVICE --workers $WORKERS --output "$RUNS" --name r50
step sweep 90 $LAUNCH sweep.py --checkpoint "$RUNS/r50" --sizes $SIZES $DEVICE --workers $WORKERS --output "$RUNS/r50-sweep"
step finetune 180 $LAUNCH finetune.py --checkpoint "$RUNS/r50" $FT $DEVICE --workers $WORKERS --name r50-ft
for f in "$RUNS"/r50/*.json "$RUNS"/r50/*.jsonl "$RUNS"/r50-ft/*.jsonl "$RUNS"/r50-ft/*.json "$RUNS"/r50-ft/*.png "$RUNS"/r50-sweep/*; do
  [ -f "$f" ] && cp "$f" "$OUT/$(basename "$(dirname "$f")")-$(basename "$f")"
done
tar czf "$OUT_ROOT/gpu_check.tar.gz" -C "$OUT_ROOT" gpu_check
ls -la "$OUT"
