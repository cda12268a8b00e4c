#!/usr/bin/env bash
# Does a longer schedule change IL vs CL? docs/results.md section 1 at 30 epochs instead of 10, seed 0:
# resnet10t + mobilenetv3_small_050, small stem, 32x32, first 5,000 training and first 5,000 test images of CIFAR-10,
# batch 128, SGD lr 0.1 momentum 0.9 wd 1e-4, cosine schedule. IL and CL run side by side, one CPU thread each
# (same seed: same initial weights and data order).
# Usage: scripts/cifar10_long_schedule.sh [DATA=../shared/data/cifar10] [OUT=runs/cifar10-30ep] [EPOCHS=30]
set -euo pipefail
DATA=${1:-../shared/data/cifar10}
OUT=${2:-runs/cifar10-30ep}
EPOCHS=${3:-30}
COMMON=(--recipe cifar10 --data "$DATA" --models resnet10t mobilenetv3_small_050 --epochs "$EPOCHS" --no-progress
        --set data.train_limit=5000 --set data.test_limit=5000 --set train.schedule=cosine
        --set train.threads=1 --seed 0)
clcli train "${COMMON[@]}" --method il --out "$OUT/il" > "$OUT-il.log" 2>&1 &
clcli train "${COMMON[@]}" --method cl --out "$OUT/cl" > "$OUT-cl.log" 2>&1 &
wait
python scripts/summarize_runs.py "$OUT"
