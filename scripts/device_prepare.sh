#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what the GPU device run (scripts/device_run.sh) carries to the H200:
#
#   .whl/            cp312 manylinux wheels of what clcli needs and the H200 image lacks: POT and `datasets`, and
#                    the needs of `datasets` that the image lacks or may hold at a version `datasets` refuses
#                    (dill, multiprocess, fsspec). One version of each: two stop the whole `pip install --no-deps`.
#   .device/cifar10/ CIFAR-10 in the Hub parquet layout (plain_text: 50,000 / 10,000), copied from
#                    ../shared/data/cifar10, which does not travel.
#   .device/commit   the commit (and whether the tree had changes) that the run records in env.json: .git does not
#                    travel.
#
# Both folders are git-ignored and named in the device call's `carry` list (docs/performance.md, "GPU"). Everything
# that travels must stay under 64 MiB: the script adds it up and fails if it does not. Idempotent: a second run
# downloads and copies nothing that is already in place.
#
#   scripts/device_prepare.sh            # then read the sizes it prints
set -euo pipefail
cd "$(dirname "$0")/.."

# Versions: those clcli's own tests run with (datasets 5.2.0 needs huggingface-hub >= 1.31, which the image has:
# 1.33.0). POT 0.9.6.post1 rather than 0.9.7.post1: the latter's wheel is 33 MB (a 175 MB BSP extension clcli does
# not use), half of what may travel.
WHEELS=(POT==0.9.6.post1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0)
LIMIT_BYTES=$((64 * 1024 * 1024))
SHARED_CIFAR10=${SHARED_CIFAR10:-}
if [ -z "$SHARED_CIFAR10" ]; then
    for candidate in ../shared/data/cifar10 /work/shared/data/cifar10; do
        if [ -d "$candidate/plain_text" ]; then SHARED_CIFAR10=$candidate; break; fi
    done
fi

# --- wheels -------------------------------------------------------------------------------------------------------
mkdir -p .whl
wheel_file() {  # the downloaded wheel of NAME==VERSION, if any (wheel names normalise case, '-' and '.')
    local name=${1%%==*} version=${1##*==}
    local stem
    stem=$(echo "$name" | tr 'A-Z-' 'a-z_')
    find .whl -maxdepth 1 -iname "${stem}-${version}-*.whl" | head -n 1
}
missing=()
for spec in "${WHEELS[@]}"; do
    [ -n "$(wheel_file "$spec")" ] || missing+=("$spec")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "downloading ${missing[*]}"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "${missing[@]}" 2>&1 | grep -v "is ignored: it is neither" || true
fi
keep=()
for spec in "${WHEELS[@]}"; do
    file=$(wheel_file "$spec")
    if [ -z "$file" ]; then echo "error: no wheel for $spec in .whl/" >&2; exit 1; fi
    keep+=("$file")
done
for file in .whl/*.whl; do  # an older version left from an earlier list would stop the install
    case " ${keep[*]} " in *" $file "*) ;; *) echo "removing $file (not in the list)"; rm -f "$file" ;; esac
done

# --- CIFAR-10 -------------------------------------------------------------------------------------------------------
mkdir -p .device/cifar10/plain_text
if [ -n "$SHARED_CIFAR10" ]; then
    for rel in plain_text/train-00000-of-00001.parquet plain_text/test-00000-of-00001.parquet; do
        if ! cmp -s "$SHARED_CIFAR10/$rel" ".device/cifar10/$rel"; then
            echo "copying $rel"
            cp "$SHARED_CIFAR10/$rel" ".device/cifar10/$rel.tmp" && mv ".device/cifar10/$rel.tmp" ".device/cifar10/$rel"
        fi
    done
    # README.md carries the Hub configs. Only plain_text (the full dataset) travels, so the exact_subset entries of
    # its front matter go: `datasets` must not look for that config's files.
    SOURCE="$SHARED_CIFAR10/README.md" python3 - <<'EOF'
import os
import re
from pathlib import Path

text = Path(os.environ["SOURCE"]).read_text()
trimmed = re.sub(r"- config_name: exact_subset\n(?:  .*\n)+", "", text)
target = Path(".device/cifar10/README.md")
if not target.is_file() or target.read_text() != trimmed:
    print("writing README.md (plain_text only)")
    target.write_text(trimmed)
EOF
elif [ ! -f .device/cifar10/plain_text/train-00000-of-00001.parquet ]; then
    echo "error: CIFAR-10 not found (../shared/data/cifar10 or /work/shared/data/cifar10); set SHARED_CIFAR10" >&2
    exit 1
fi

# --- commit ---------------------------------------------------------------------------------------------------------
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit="$commit+changes"; fi
printf '%s\n' "$commit" > .device/commit

# --- size of what travels -------------------------------------------------------------------------------------------
bytes_of() { if [ -e "$1" ]; then du -sb "$1" | cut -f1; else echo 0; fi; }
tree_bytes=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null || true) \
             | awk '{s += $1} END {print s + 0}')
whl_bytes=$(bytes_of .whl)
data_bytes=$(bytes_of .device)
total=$((tree_bytes + whl_bytes + data_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "working tree (tracked + untracked, not ignored): $(mib "$tree_bytes")"
echo ".whl:    $(mib "$whl_bytes") ($(ls .whl | tr '\n' ' '))"
echo ".device: $(mib "$data_bytes")"
echo "total:   $(mib "$total") of 64 MiB"
if [ "$total" -ge "$LIMIT_BYTES" ]; then
    echo "error: what travels is over the device tool's 64 MiB limit" >&2
    exit 1
fi
