#!/usr/bin/env bash
# Why does CL not beat IL at a small CPU budget? One knob at a time against the default CL (alpha 0.2, dot metric,
# mul fusion, one MKB, siamese input, simultaneous updates), on the same setting as the comparison in
# docs/results.md: quickstart recipe (resnet10t + mobilenetv3_small_050, ImageNet stems, 32x32) on the first 5,000
# CIFAR-10 training images and 2,000 test images, 6 epochs, cosine lr 0.05, batch 64, one CPU thread; seeds 0 and 1.
# The IL and default-CL references are the compare runs (reports/.../runs/{il,cl}/seed{0,1}).
# Usage: scripts/cl_ablation.sh [DATA=../shared/data/cifar10] [OUT=runs/cl-ablation]
set -euo pipefail
DATA=${1:-../shared/data/cifar10}
OUT=${2:-runs/cl-ablation}
COMMON=(--recipe quickstart --data "$DATA" --method cl --epochs 6 --no-progress --set data.train_limit=5000
        --set data.test_limit=2000 --set train.threads=1)
declare -A VARIANTS=(
  [fuse-add]="--set cl.fuse=add"
  [alpha-0]="--set cl.alpha=0"
  [alpha-1]="--set cl.alpha=1"
  [metric-cosine]="--set cl.metric=cosine"
  [mkbs-2]="--set cl.mkbs=2"
)
for seed in 0 1; do
  for name in fuse-add alpha-0 alpha-1 metric-cosine mkbs-2; do
    dir="$OUT/$name/seed$seed"
    if [ -f "$dir/run.json" ] && grep -q '"finished"' "$dir/run.json"; then continue; fi
    # shellcheck disable=SC2086
    clcli train "${COMMON[@]}" --seed "$seed" ${VARIANTS[$name]} --out "$dir" --force
  done
done
