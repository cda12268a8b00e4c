#!/usr/bin/env bash
# The measured CPU comparison in docs/results.md: IL vs CL (mul and add fusion), seeds 0 and 1 on real CIFAR-10.
# resnet10t + mobilenetv3_small_050, small stem, 32x32, first 5,000 training images, first 5,000 test images,
# 10 epochs, batch 128, SGD lr 0.1 momentum 0.9 wd 1e-4, cosine schedule; seeds 0 and 1; one CPU thread
# (steadier than two on a shared 2-core machine).
# Usage: scripts/cifar10_il_vs_cl.sh [DATA=../shared/data/cifar10] [OUT=runs/cifar10-cpu]
set -euo pipefail
DATA=${1:-../shared/data/cifar10}
OUT=${2:-runs/cifar10-cpu}
COMMON=(--recipe cifar10 --data "$DATA" --models resnet10t mobilenetv3_small_050 --epochs 10 --no-progress
        --set data.train_limit=5000 --set data.test_limit=5000 --set train.schedule=cosine
        --set train.threads=1)
for seed in 0 1; do
  clcli train "${COMMON[@]}" --seed $seed --method il,cl --out "$OUT/seed$seed"
  clcli train "${COMMON[@]}" --seed $seed --method cl --set cl.fuse=add --out "$OUT/seed$seed-add"
done
