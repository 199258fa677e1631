#!/usr/bin/env bash
# The one-command check for a lent H100/H200: builds normext for the GPU found, runs `make test` (the whole
# suite, CUDA tests included, as junit XML), compute-sanitizer memcheck / racecheck / synccheck on a few
# small CUDA cases, and `make bench` on the GPU suite; everything lands in ${OUT:-./gpu_check_out}.
#
# Made for that machine as it is: its Python (/opt/torch/.venv/bin/python3, or $PYTHON) is used with the
# packages it has, nothing is installed and nothing needs the network. Each step has a time limit and the
# whole run stays within GPU_CHECK_TOTAL_S seconds (default 540: a session has 15 device minutes, the
# machine's start included, and a rerun should still fit). A failing or timed-out step does not stop the
# next one; every step's status is printed last and written to summary.txt; exit status 1 if any failed.
# Without a GPU (a dry run, as tools/gpu_machine_sim.sh does) the GPU steps say "no GPU" and go on.
#
# Knobs (seconds): GPU_CHECK_TOTAL_S, GPU_CHECK_BUILD_S, GPU_CHECK_TESTS_S, GPU_CHECK_SANITIZER_S (each
# tool), GPU_CHECK_BENCH_S; GPU_CHECK_BENCH_ARGS (default: the quick GPU suite without the compile
# baseline), GPU_CHECK_SANITIZER_K (the pytest -k selection run under compute-sanitizer), MAX_JOBS (default:
# all cores).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
if [ -z "${PYTHON:-}" ]; then
    PYTHON=/opt/torch/.venv/bin/python3
    [ -x "$PYTHON" ] || PYTHON=$(command -v python3)
fi
TOTAL_S=${GPU_CHECK_TOTAL_S:-540}
# A fresh build is mostly the CPU kernels, compiled once per CPU capability (DEFAULT, AVX2, AVX512): setup.py
# runs those three ninja calls and the CUDA one side by side, MAX_JOBS shared out between them, so the
# build takes about as long as its slowest file once the machine has a core per file (14 files). Not
# measured on the GPU machine: BUILD_S is a guess from this repository's 2-core machines.
BUILD_S=${GPU_CHECK_BUILD_S:-240}
TESTS_S=${GPU_CHECK_TESTS_S:-180}
SANITIZER_S=${GPU_CHECK_SANITIZER_S:-50}
BENCH_S=${GPU_CHECK_BENCH_S:-100}
# The quick GPU suite (64 variants): the full one (284) does not fit beside the rest; run it on its own.
# Without the torch.compile baseline, whose compiles (seconds per variant) do not fit in BENCH_S either;
# for it, a few variants (no quotes or shell characters: make's shell splits the options), e.g.
# GPU_CHECK_BENCH_ARGS="--quick --filter unet.64/bf16 --filter vit_b.ln/bf16 --filter retinanet.head.stack/bf16".
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---quick --no-compile}
# Small CUDA cases of every norm family and layout, forward and backward, through each kernel path (odd
# extents, vector tails, multi-block groups, poisoned outputs): about 170 tests. Only normext's kernels are
# instrumented (--kernel-name kns=normext), which keeps torch's own launches at full speed.
SANITIZER_K=${GPU_CHECK_SANITIZER_K:-cuda and (ops_against_reference or test_shapes or ln_row_lengths or \
(test_instance_norm and poisoned) or (test_group_norm and odd_shapes))}
SANITIZER_FILES=(tests/test_group_norm.py tests/test_instance_norm.py tests/test_layer_norm.py tests/test_batch_norm.py)
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
# The device tool brings back at most 8 files from $OUT: summary.txt, build.log, tests.log, tests.xml,
# sanitizer.log, bench.log and the bench's JSON and PNG (its .txt table is also in bench.log).
SUMMARY=$OUT/summary.txt
START=$(date +%s)
STEPS=()

left() { echo $((TOTAL_S - ($(date +%s) - START))); }

record() { # name status seconds
    STEPS+=("$(printf '%-20s %-48s %4ds' "$1" "$2" "$3")")
    printf '\n-- %s: %s (%ds)\n' "$1" "$2" "$3"
}

# step NAME LIMIT LOG COMMAND...: runs COMMAND for at most LIMIT seconds (less if the total budget is
# nearly spent), appending its output to LOG; records ok / FAILED / TIMED OUT / NOT RUN.
step() {
    local name=$1 limit=$2 log=$3 t0 rc status
    shift 3
    local budget
    budget=$(left)
    [ "$budget" -lt "$limit" ] && limit=$budget
    if [ "$limit" -lt 10 ]; then
        record "$name" "NOT RUN: the time budget is spent" 0
        return 1
    fi
    printf '\n== %s (at most %ds): %s\n' "$name" "$limit" "$*" | tee -a "$log"
    t0=$(date +%s)
    timeout -k 15 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    case $rc in
    0) status=ok ;;
    124 | 137) status="TIMED OUT after ${limit}s" ;;
    86) status="FAILED (the sanitizer reported errors)" ;;
    *) status="FAILED (exit $rc)" ;;
    esac
    record "$name" "$status" $(($(date +%s) - t0))
    tail -n 5 "$log"
    return $rc
}

# ------------------------------------------------------------------------------------------ the machine
{
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), $(nproc) cores, commit" \
        "$(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git status --porcelain 2>/dev/null | grep -q . && echo ' +changes')"
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L 2>&1; else echo "nvidia-smi: not found"; fi
    "$PYTHON" -c 'import sys, torch; print("Python", sys.version.split()[0], sys.executable, "| torch", torch.__version__,
        "| CUDA", torch.version.cuda)' 2>&1
    command -v nvcc >/dev/null && nvcc --version | tail -n 1
} | tee "$OUT/build.log"
GPU=$("$PYTHON" -c 'import torch
if torch.cuda.is_available():
    print("%d.%d" % torch.cuda.get_device_capability(0), torch.cuda.get_device_name(0))' 2>>"$OUT/build.log")
if [ -n "$GPU" ]; then
    # Build for the GPU that is here, and fail rather than build CPU-only.
    export TORCH_CUDA_ARCH_LIST=${GPU%% *} NORMEXT_FORCE_CUDA=1
    echo "GPU: ${GPU#* } (compute capability $TORCH_CUDA_ARCH_LIST)" | tee -a "$OUT/build.log"
else
    # The dry run builds what a lent H100/H200 would run.
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    echo "no GPU visible: a dry run (CUDA kernels built for $TORCH_CUDA_ARCH_LIST, GPU steps skipped)" |
        tee -a "$OUT/build.log"
fi

# -------------------------------------------------------------------------------------------- the steps
# The two commands as README gives them (make build/test/bench); where the image has no make, what those
# targets run, so that the device minutes are not lost to it.
HAVE_MAKE=1
if ! command -v make >/dev/null; then
    HAVE_MAKE=0
    echo "make not found: running the commands of its targets directly" | tee -a "$OUT/build.log"
    PATH="$(dirname "$PYTHON"):$PATH" # ninja beside the Python, as the Makefile puts it
fi
if [ $HAVE_MAKE -eq 1 ]; then
    BUILD=(make build PYTHON="$PYTHON")
else
    BUILD=("$PYTHON" setup.py -q build_ext --inplace)
fi
if step build "$BUILD_S" "$OUT/build.log" "${BUILD[@]}"; then
    step info 30 "$OUT/build.log" "$PYTHON" -m normext.info
    built=1
else
    built=0
fi

pytest_args=(--junitxml="$OUT/tests.xml" -p no:cacheprovider)
# The image has pytest-xdist and pytest-timeout: spread the suite over workers (each its own CUDA context),
# and let one hung test fail instead of eating the step's time.
if "$PYTHON" -c 'import xdist' 2>/dev/null; then
    workers=$(($(nproc) / 2))
    [ "$workers" -gt 8 ] && workers=8
    [ "$workers" -ge 2 ] && pytest_args+=(-n "$workers")
fi
"$PYTHON" -c 'import pytest_timeout' 2>/dev/null && pytest_args+=(--timeout 120)
name=tests
if [ -z "$GPU" ]; then
    echo "no GPU: only the CUDA tests are selected (-k cuda), and they skip; the CPU suite is make test's"
    pytest_args+=(-k cuda)
    name="tests (no GPU)"
fi
if [ $HAVE_MAKE -eq 1 ]; then
    # The emulated CUDA run (make test-emu) is for machines without a GPU: here the kernels run for real.
    TESTS=(make test PYTHON="$PYTHON" PYTEST_ARGS="${pytest_args[*]}" TEST_EMU=0)
else
    TESTS=("$PYTHON" -m pytest tests -q -ra "${pytest_args[@]}")
fi
if [ $built -eq 0 ]; then
    record "$name" "skipped: the build failed" 0
else
    step "$name" "$TESTS_S" "$OUT/tests.log" "${TESTS[@]}"
fi

SANITIZER=$(command -v compute-sanitizer)
for c in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -z "$SANITIZER" ] && [ -x "$c" ] && SANITIZER=$c
done
for tool in memcheck racecheck synccheck; do
    if [ -z "$GPU" ]; then
        record "sanitizer $tool" "skipped: no GPU" 0
    elif [ -z "$SANITIZER" ]; then
        record "sanitizer $tool" "skipped: compute-sanitizer not found" 0
    elif [ $built -eq 0 ]; then
        record "sanitizer $tool" "skipped: the build failed" 0
    else
        # Exit 86: the sanitizer found errors (a failing test alone exits 1).
        step "sanitizer $tool" "$SANITIZER_S" "$OUT/sanitizer.log" "$SANITIZER" --tool "$tool" \
            --kernel-name kns=normext --report-api-errors no --print-limit 20 --error-exitcode 86 \
            "$PYTHON" -m pytest "${SANITIZER_FILES[@]}" -q -p no:cacheprovider -k "$SANITIZER_K"
    fi
done

if [ -z "$GPU" ]; then
    record bench "skipped: no GPU (make bench runs the CPU suite)" 0
elif [ $built -eq 0 ]; then
    record bench "skipped: the build failed" 0
else
    if [ $HAVE_MAKE -eq 1 ]; then
        BENCH=(make bench PYTHON="$PYTHON" BENCH_ARGS="--out $OUT/bench $BENCH_ARGS")
    else
        # shellcheck disable=SC2206  # BENCH_ARGS is a list of options
        BENCH=("$PYTHON" -m normext.bench --out "$OUT/bench" $BENCH_ARGS)
    fi
    step bench "$BENCH_S" "$OUT/bench.log" "${BENCH[@]}"
    rm -f "$OUT"/bench/*.txt
fi

# ------------------------------------------------------------------------------------------- the summary
{
    echo
    echo "gpu_check summary (${GPU:-no GPU}; $(($(date +%s) - START))s of $TOTAL_S; files in $OUT)"
    printf '%s\n' "${STEPS[@]}"
    tests=$(grep -E '[0-9]+ (passed|failed|skipped|deselected|errors?)\b.* in [0-9.]+s' "$OUT/tests.log" 2>/dev/null | tail -n 1)
    [ -n "$tests" ] && echo "tests: $tests"
    grep -hE 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer.log" 2>/dev/null | sed 's/^/sanitizer: /'
} | tee "$SUMMARY"
! printf '%s\n' "${STEPS[@]}" | grep -qE 'FAILED|TIMED OUT|NOT RUN'
