#!/usr/bin/env bash
# Does CL help at the largest budget the CPU allows? (docs/results.md section 4)
# Full CIFAR-10 (50,000 train / 10,000 test), resnet10t + mobilenetv3_small_050 with ImageNet stems at 32 px (the
# quickstart recipe's networks), batch 128, SGD lr 0.1 Nesterov momentum 0.9, wd 5e-4, cosine, pad-4 crop + flip,
# EPOCHS epochs (default 10), seeds 0, 1, 2, methods IL, DML and CL through `clcli compare`.
# Each seed is its own compare into the same report folder (runs are reused), two seeds at a time with one thread
# each; a last compare over the three seeds writes table.md, results.csv and curves.png. Re-running resumes.
# Usage: scripts/cifar10_full.sh [DATA=../shared/data/cifar10] [OUT=reports/cifar10-full] [EPOCHS=10] [EXTRA --set ...]
set -euo pipefail
DATA=${1:-../shared/data/cifar10}
OUT=${2:-reports/cifar10-full}
EPOCHS=${3:-10}
shift $(( $# < 3 ? $# : 3 ))
METHODS=${METHODS:-il,dml,cl}
source "$(dirname "$0")/cifar10_full_settings.sh"
COMMON=("${FULL_SETTINGS[@]}" --data "$DATA" --epochs "$EPOCHS" --methods "$METHODS" "$@")
mkdir -p "$OUT"
seed_run() { clcli compare "${COMMON[@]}" --seeds 1 --set train.seed="$1" --out "$OUT" > "$OUT/seed$1.log" 2>&1; }
seed_run 0 & seed_run 1 & wait
seed_run 2
clcli compare "${COMMON[@]}" --seeds 3 --out "$OUT" > "$OUT/table.log" 2>&1
cat "$OUT/table.md"
