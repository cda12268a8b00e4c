#!/usr/bin/env bash
# CL variants beyond the paper (docs/results.md section 4) at the setting of scripts/cifar10_full.sh: each variant is
# a `clcli compare` of CL alone into its own report folder, whose IL runs are the baseline report's (linked, never
# retrained: compare reuses them because a CL variant changes only the recipe's cl section). Two variants at a time,
# one thread each. Re-running resumes unfinished runs and reuses finished ones.
# Usage: scripts/cl_variants.sh DATA BASE OUT EPOCHS VARIANT [VARIANT ...]
#   VARIANT is NAME:key=value[,key=value...], e.g.  warmup3:cl.alpha_warmup=3  soft-ens:cl.soft_weight=1
#   SEEDS (environment, default 1): seeds 0..SEEDS-1; their IL runs must be finished in BASE.
set -euo pipefail
DATA=$1 BASE=$(realpath "$2") OUT=$3 EPOCHS=$4
shift 4
SEEDS=${SEEDS:-1}
source "$(dirname "$0")/cifar10_full_settings.sh"
for ((s = 0; s < SEEDS; s++)); do
  if ! grep -q '"status": "finished"' "$BASE/runs/il/seed$s/run.json" 2>/dev/null; then
    echo "the IL run of seed $s in $BASE is not finished: run scripts/cifar10_full.sh first" >&2; exit 2
  fi
done
variant() {
  local name=${1%%:*} sets=() kv
  IFS=, read -ra kv <<< "${1#*:}"
  for s in "${kv[@]}"; do sets+=(--set "$s"); done
  mkdir -p "$OUT/$name/runs"
  [ -e "$OUT/$name/runs/il" ] || ln -s "$BASE/runs/il" "$OUT/$name/runs/il"
  clcli compare "${FULL_SETTINGS[@]}" --data "$DATA" --epochs "$EPOCHS" --methods cl --seeds "$SEEDS" "${sets[@]}" \
    --out "$OUT/$name" \
    > "$OUT/$name.log" 2>&1 && echo "$name: $(grep -m1 '^| CL' "$OUT/$name/table.md")"
}
mkdir -p "$OUT"
while (($#)); do
  variant "$1" & shift
  if (($#)); then variant "$1" & shift; fi
  wait
done
