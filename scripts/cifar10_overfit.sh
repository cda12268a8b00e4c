#!/usr/bin/env bash
# Does CL help where both networks overfit? (docs/results.md section 5, issue 25)
# The first 10,000 CIFAR-10 training images, all 10,000 test images, batch 128, 40 epochs, seeds 0-2; resnet10t and
# a weaker network WEAK (chosen by an IL pilot, docs/results.md), both with ImageNet stems at 32 px (the quickstart
# recipe's stems and size). RECIPE is one of
#   paper    SGD lr 0.1 Nesterov momentum 0.9, wd 5e-4, cosine, pad-4 crop + flip (section 4's recipe)
#   current  the current recipe of section 5, frozen after its IL pilot: the CURRENT_SETTINGS below
# Each seed is its own `clcli compare` into OUT/RECIPE (runs are reused), two seeds at a time with one thread each;
# a last compare over the three seeds writes table.md, results.csv and curves.png, then scripts/train_accuracy.py
# measures every run on its un-augmented training images (OUT/train_accuracy.json) and scripts/overfit_report.py
# prints the section's tables. Re-running resumes.
# SITES picks CL's MKB site by the probe table's number (`clcli probe resnet10t WEAK`): section 5 ran at commit
# 394b0c6, whose probe planned layer2 / s2 (4x4), listed as site 2 since issue 28; the default now is site 1,
# layer3 / s3 (2x2), measured separately (section 5, "the site").
# Usage: scripts/cifar10_overfit.sh DATA OUT RECIPE WEAK [METHODS=il,cl] [SITES=2]   e.g.
#   scripts/cifar10_overfit.sh ../shared/data/cifar10 reports/overfit paper mobilenetv2_050
#   METHODS=dml scripts/cifar10_overfit.sh ../shared/data/cifar10 reports/overfit paper mobilenetv2_050
set -euo pipefail
DATA=$1 OUT=$2 RECIPE=$3 WEAK=$4
METHODS=${METHODS:-il,cl}
EPOCHS=${EPOCHS:-40}
SEEDS=${SEEDS:-3}
SITES=${SITES:-}
COMMON=(--recipe quickstart --no-progress --data "$DATA" --epochs "$EPOCHS" --methods "$METHODS"
        --set "models=[resnet10t, $WEAK]" --set data.train_limit=10000 --set train.batch_size=128
        --set train.lr=0.1 --set train.threads=1)
# The current recipe (section 5): label smoothing, mixup/cutmix, RandAugment, random erasing, EMA on top of the paper
# recipe's optimiser and schedule. Frozen after its one IL pilot (seed 0, docs/results.md section 5), which is also
# the grid's IL run of seed 0.
CURRENT_SETTINGS=(--set train.warmup_epochs=2 --set train.label_smoothing=0.1 --set train.mixup=0.2
                  --set train.cutmix=1.0 --set train.mixup_prob=0.5 --set data.auto_augment=rand-m9-n2-mstd0.5
                  --set data.re_prob=0.25 --set train.ema_decay=0.999)
if [[ -n $SITES ]]; then COMMON+=(--set "cl.sites=[$SITES]"); fi
case $RECIPE in
  paper) ;;
  current) COMMON+=("${CURRENT_SETTINGS[@]}") ;;
  *) echo "RECIPE must be paper or current, got '$RECIPE'" >&2; exit 2 ;;
esac
REPORT=$OUT/$RECIPE
mkdir -p "$REPORT"
seed_run() { clcli compare "${COMMON[@]}" --seeds 1 --set train.seed="$1" --out "$REPORT" > "$REPORT/seed$1.log" 2>&1; }
for ((s = 0; s < SEEDS; s += 2)); do
  seed_run "$s" &
  if ((s + 1 < SEEDS)); then seed_run $((s + 1)) & fi
  wait
done
clcli compare "${COMMON[@]}" --seeds "$SEEDS" --out "$REPORT" > "$REPORT/table.log" 2>&1
HERE=$(dirname "$0")
python "$HERE/train_accuracy.py" "$REPORT" --out "$OUT/train_accuracy.json"
python "$HERE/overfit_report.py" "$OUT"
