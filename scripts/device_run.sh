#!/usr/bin/env bash
# The one GPU device run: everything clcli needs proven on one H200, in at most 7 minutes of wall time.
#
#   bash scripts/device_run.sh          # on the device machine (the `run` tool; docs/performance.md, "GPU")
#   ONLY="cuda_tests bench" BUDGET_S=240 bash scripts/device_run.sh     # a second try of some phases
#   bash scripts/device_run.sh --dry    # the rehearsal: every phase on the CPU, tiny models, a few hundred images
#
# Needs scripts/device_prepare.sh to have filled .whl/ and .device/ (both carried). Phases, each under its own time
# cap so that a slow one cannot starve the rest (a cap is cut to the time left before the overall deadline; the caps
# before cifar10 and the time kept for it add up to at most the budget, checked at the start):
#
#   install      POT, datasets & co. from .whl/ into /tmp/clcli-site (pip --no-index --no-deps --target); clcli
#                itself with `pip install --no-deps -e .` (the machine's torch is never touched); then whether the
#                image's pyarrow, huggingface_hub and tqdm satisfy the carried datasets (stops, naming the package)
#   env          env.json: GPU, driver, torch / CUDA / cuDNN / timm versions, the carried packages, clcli commit
#   cuda_tests   pytest -m cuda (tests/test_cuda.py), each test capped (pytest-timeout) so that a slow one fails
#                alone; the phase's cap stops pytest with SIGINT, which still writes cuda_tests.xml
#   bench        clcli bench resnet34 mobilenetv2_100 --stem small, batch 128 at 32 px, eager (with the data
#                pipeline, W2 and WEL costs)
#   bench_compile the same with --compile, the steps only (what bench.json compares)
#   cifar10      full CIFAR-10, CL then IL of the same pair from the same weights and data order, as many epochs
#                as fit before the deadline (decided from the measured step and decode times, and printed)
#
# Everything printed is also in $OUT/log. $OUT gets at most 5 files: log, env.json, cuda_tests.xml, bench.json,
# cifar10.json. BUDGET_S (default 420) is the wall time the whole run takes at most: with the device call's
# timeout_s=450 and a machine's start, a second try (ONLY=phases, install and env always run) fits in the
# 15 minutes of a loan. CAP_SCALE multiplies every cap.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
if [ $DRY = 1 ]; then
    # The rehearsal finishes in a minute or two on an idle 2-core CPU; a machine shared with other jobs can take
    # several times that, so its budget and caps are wide: it checks that every phase works, not how fast.
    BUDGET_S=${BUDGET_S:-1500}
    CAP_SCALE=${CAP_SCALE:-6}
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/clcli-device-dry.XXXXXX")
    OUT=${OUT:-$WORK/out}
else
    BUDGET_S=${BUDGET_S:-420}
    CAP_SCALE=${CAP_SCALE:-1}
    WORK=/tmp/clcli-device
    : "${OUT:?OUT is not set: this runs on the device machine (or use --dry)}"
fi
DEADLINE=$((START + BUDGET_S))
SITE=$WORK/site
export CLCLI_CACHE=${CLCLI_CACHE:-$WORK/cache}
mkdir -p "$OUT" "$WORK"

# Caps in seconds on the GPU (times CAP_SCALE); CIFAR10_KEEP: what the caps before it leave to the cifar10 phase.
CAP_INSTALL=60 CAP_ENV=15 CAP_CUDA_TESTS=140 CAP_BENCH=45 CAP_BENCH_COMPILE=85 CAP_BENCH_SUMMARY=10
CIFAR10_KEEP=60
TEST_TIMEOUT=75  # per CUDA test: a cold Inductor compile, or three CLI subprocesses
GPU_BUDGET=420
ONLY=${ONLY:-}

declare -a PHASES=()
left() { echo $((DEADLINE - $(date +%s))); }
wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

# phase NAME CAP COMMAND...: run COMMAND under `timeout` (CAP seconds, or the time left if less; PHASE_SIGNAL, default
# TERM, is what stops it); record rc and time. A phase left out by ONLY is not run and not recorded.
phase() {
    local name=$1 cap=$2
    shift 2
    if ! wanted "$name" && [ "$name" != install ] && [ "$name" != env ]; then
        echo "=== $name: not in ONLY ($ONLY)"
        return 0
    fi
    local rest
    rest=$(left)
    cap=$((cap * CAP_SCALE))
    [ "$cap" -gt "$rest" ] && cap=$rest
    if [ "$cap" -lt 5 ]; then
        echo "=== $name: skipped, ${rest}s left"
        PHASES+=("$name=125:0")
        return 125
    fi
    echo "=== $name (cap ${cap}s, $(date +%T), ${rest}s left)"
    local t0 rc
    t0=$(date +%s)
    timeout --signal="${PHASE_SIGNAL:-TERM}" --kill-after=10 "$cap" "$@"
    rc=$?
    echo "=== $name: rc $rc after $(($(date +%s) - t0))s"
    PHASES+=("$name=$rc:$(($(date +%s) - t0))")
    return $rc
}

install_packages() {
    if ls .whl/*.whl >/dev/null 2>&1 && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .whl/*.whl || return 1
    elif ls .whl/*.whl >/dev/null 2>&1; then
        # The wheels are for the H200 image's Python 3.12: elsewhere (the rehearsal) they are installed for 3.12
        # into a folder nobody imports from, which checks them (one version each, all installable), and the
        # installed packages are used.
        echo "python3 is not 3.12: installing .whl/ for 3.12 into $SITE-3.12 as a check; using the installed packages"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE-3.12" \
            --python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 .whl/*.whl || return 1
    else
        echo "no .whl/: using the installed POT and datasets (run scripts/device_prepare.sh before a device run)"
    fi
    # Asked from / : in the repository `import clcli` finds the source folder whether installed or not.
    if (cd / && PYTHONPATH=$SITE python3 -c "import clcli, sys; sys.exit(not clcli.__file__.startswith('$REPO/'))" \
            2>/dev/null); then
        echo "clcli already imports from $REPO"
    else
        # No build isolation: nothing can be fetched there, and setuptools is in the image.
        python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . \
            || python3 -m pip install -q --no-deps --no-index --no-build-isolation --target "$SITE" . || return 1
    fi
    PYTHONPATH=$SITE python3 -c "import clcli, datasets, ot, timm, torch; print('clcli', clcli.__file__, \
'| datasets', datasets.__version__, '| POT', ot.__version__, '| timm', timm.__version__, '| torch', torch.__version__)" \
        || return 1
    PYTHONPATH=$SITE python3 scripts/device_phases.py deps
}

main() {
    echo "clcli device run ($([ $DRY = 1 ] && echo dry, CPU || echo GPU)), budget ${BUDGET_S}s, out $OUT, work $WORK"
    local caps=$((CAP_INSTALL + CAP_ENV + CAP_CUDA_TESTS + CAP_BENCH + CAP_BENCH_COMPILE + CAP_BENCH_SUMMARY))
    echo "GPU caps: ${caps}s before cifar10 + ${CIFAR10_KEEP}s kept for it = $((caps + CIFAR10_KEEP))s of the" \
        "${GPU_BUDGET}s budget"
    if [ $((caps + CIFAR10_KEEP)) -gt $GPU_BUDGET ]; then
        echo "stop: the phase caps exceed the budget"
        return 2
    fi
    if ! phase install $CAP_INSTALL bash -c "$(declare -f install_packages); SITE='$SITE' REPO='$REPO' \
            install_packages"; then
        echo "stop: the install failed (see above): nothing else can run"
        return 1
    fi
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    local dry_flag=() models=(resnet34 mobilenetv2_100) bench_args clcli="python3 -m clcli"
    if [ $DRY = 1 ]; then
        dry_flag=(--dry)
        models=(test_resnet test_efficientnet)
        bench_args=(--device cpu --threads 1 --batch-size 16 --seconds 0 --rounds 2)
        clcli="python3 scripts/device_phases.py dry-clcli"  # torch.compile's eager backend: no C++ build
    else
        bench_args=(--device cuda --batch-size 128 --seconds 5 --rounds 20)
    fi
    phase env $CAP_ENV python3 scripts/device_phases.py env "$OUT/env.json" "${dry_flag[@]}"
    local per_test=()
    if python3 -c "import pytest_timeout" 2>/dev/null; then
        per_test=(--timeout=$((TEST_TIMEOUT * CAP_SCALE)))
    else
        echo "note: no pytest-timeout here: the CUDA tests run without a per-test cap"
    fi
    PHASE_SIGNAL=INT phase cuda_tests $CAP_CUDA_TESTS python3 -m pytest -m cuda -q -p no:cacheprovider \
        tests/test_cuda.py "${per_test[@]}" --junitxml="$OUT/cuda_tests.xml"
    phase bench $CAP_BENCH bash -c "$clcli bench ${models[*]} --stem small --input-size 32 ${bench_args[*]} \
        --json > '$WORK/bench_eager.json'"
    phase bench_compile $CAP_BENCH_COMPILE bash -c "$clcli bench ${models[*]} --stem small --input-size 32 \
        ${bench_args[*]} --compile --steps-only --json > '$WORK/bench_compiled.json'"
    phase bench_summary $CAP_BENCH_SUMMARY python3 scripts/device_phases.py bench "$OUT/bench.json" \
        "$WORK/bench_eager.json" "$WORK/bench_compiled.json"
    # Training stops itself at the deadline less 20 s (for its last writes and the summary below); the cap is a
    # backstop.
    phase cifar10 $((($(left) - 5) / CAP_SCALE)) python3 scripts/device_phases.py cifar10 "$OUT/cifar10.json" \
        --deadline $((DEADLINE - 20)) --bench "$OUT/bench.json" --work "$WORK/runs" "${dry_flag[@]}"
    python3 scripts/device_phases.py phases "$OUT/env.json" "${PHASES[@]}"
    echo "=== summary ($(($(date +%s) - START))s in all)"
    local failed=0 item
    for item in "${PHASES[@]}"; do
        printf '%-14s rc %-4s %ss\n' "${item%%=*}" "$(echo "${item#*=}" | cut -d: -f1)" "${item##*:}"
        [ "$(echo "${item#*=}" | cut -d: -f1)" = 0 ] || failed=1
    done
    ls -l "$OUT"
    return $failed
}

main 2>&1 | tee "$OUT/log"
