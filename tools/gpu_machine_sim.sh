#!/usr/bin/env bash
# Reproduces the lent GPU machine here, less its GPU: a Python 3.12 virtual environment holding torch
# 2.11.0+cu130, torchvision 0.26, timm, pytest, ninja, pybind11 and matplotlib (no ruff), and no network.
# Then runs `make test`, `make bench BENCH_ARGS=--quick` and a dry run of tools/gpu_check.sh in a copy of
# this working tree. Run it after any change to the Makefile, setup.py or .ci/run; not part of CI.
#
#   tools/gpu_machine_sim.sh [setup] [test] [bench] [check]     (default: test bench check)
#
# The first run downloads about 3 GB of wheels (network needed, once) into $GPU_SIM_DIR/wheels and
# installs them into $GPU_SIM_DIR/torch-venv, the stand-in for /opt/torch/.venv; later runs reuse both.
# Knobs: GPU_SIM_DIR (default /work/cache/gpu-sim, outside the repo), GPU_SIM_PYTHON (a python3.12),
# MAX_JOBS (default 2), TORCH_CUDA_ARCH_LIST (default 9.0, the H100/H200's), GPU_SIM_KEEP_COPY=1 (update
# the last copy in place, keeping its build/, instead of a fresh one: for quick reruns, not for the verdict).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIM=${GPU_SIM_DIR:-/work/cache/gpu-sim}
WHEELS=$SIM/wheels
ENV=$SIM/torch-venv
COPY=$SIM/repo
LOGS=$SIM/logs
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(test bench check)
# What the GPU machine's /opt/torch/.venv holds that normext's commands touch (KINDS.md of the device
# tool); setuptools<82 is torch 2.11's own cap.
PACKAGES=(torch==2.11.0 torchvision==0.26.0 timm==1.0.31 numpy pytest pytest-xdist ninja pybind11 matplotlib
    "setuptools<82" wheel pillow pyyaml)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2}

say() { printf '\n== %s\n' "$*"; }

find_python312() {
    local c
    for c in ${GPU_SIM_PYTHON:-} python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 \
        "$(command -v uv >/dev/null && uv python find 3.12 2>/dev/null)"; do
        [ -n "$c" ] || continue
        # sys.executable, not a pyenv shim: the venv must not depend on the shim's resolution.
        "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12); print(sys.executable)' 2>/dev/null && return
    done
    return 1
}

setup() {
    local stamp="${PACKAGES[*]}"
    if [ "$(cat "$ENV/.sim-complete" 2>/dev/null)" == "$stamp" ]; then
        echo "reusing $ENV ($("$ENV/bin/python3" -c 'import torch; print(torch.__version__)'))"
        return 0
    fi
    local py
    py=$(find_python312) || {
        echo "no Python 3.12 found (tried GPU_SIM_PYTHON, python3.12 on PATH, pyenv, uv python find):"
        echo "install one, e.g. 'uv python install 3.12' or 'pyenv install 3.12', and run again"
        return 2
    }
    mkdir -p "$WHEELS"
    if [ "$(cat "$WHEELS/.sim-complete" 2>/dev/null)" != "$stamp" ]; then
        say "downloading ${PACKAGES[*]} for $py into $WHEELS (once; about 3 GB)"
        "$py" -m pip download -q --only-binary=:all: -d "$WHEELS" "${PACKAGES[@]}" || return 1
        echo "$stamp" >"$WHEELS/.sim-complete"
    fi
    say "installing them into $ENV, offline"
    rm -rf "$ENV"
    "$py" -m venv "$ENV" || return 1
    PIP_CONFIG_FILE=/dev/null "$ENV/bin/python3" -m pip install -q --no-index --find-links "$WHEELS" \
        "${PACKAGES[@]}" || return 1
    echo "$stamp" >"$ENV/.sim-complete"
}

# Runs "$@" as on the GPU machine: no network at all (a network namespace of its own with only the
# loopback up, which torch.distributed's gloo tests use) and pip unable to reach any index, with no
# config file (this machine's /etc/xdg/pip adds a local mirror and find-links).
offline() {
    local vars=(PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_INDEX_URL=http://127.0.0.1:9/)
    if unshare --net true 2>/dev/null; then
        env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT "${vars[@]}" \
            unshare --net sh -c 'ip link set lo up && exec "$@"' sh "$@"
    else
        echo "(unshare --net is not permitted here: pip is cut off from every index, the rest is not)"
        env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT "${vars[@]}" "$@"
    fi
}

# A fresh copy of the working tree (tracked and untracked-but-not-ignored files, as the device tool sends
# it): no .venv, no build/, no compiled extension.
fresh_copy() {
    [ "${GPU_SIM_KEEP_COPY:-0}" == 1 ] || rm -rf "$COPY"
    mkdir -p "$COPY" || return 1
    (cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) |
        tar -C "$COPY" -xf -
}

declare -A STATUS TIME
run_step() { # name command...: runs it in the copy, offline, logged under $LOGS
    local name=$1 start rc
    shift
    say "$name: $* (log: $LOGS/$name.log)"
    start=$(date +%s)
    (cd "$COPY" && offline "$@") 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    TIME[$name]=$(($(date +%s) - start))
    STATUS[$name]=$([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)")
}

mkdir -p "$LOGS"
setup || exit
PY="$ENV/bin/python3"
copied=0
for step in "${STEPS[@]}"; do
    if [ "$step" != setup ] && [ $copied -eq 0 ]; then
        fresh_copy || { echo "could not copy $REPO to $COPY"; exit 1; }
        copied=1
    fi
    case $step in
    setup) ;;
    test) run_step make-test make test PYTHON="$PY" ;;
    bench) run_step make-bench make bench PYTHON="$PY" BENCH_ARGS=--quick ;;
    check) run_step gpu-check env PYTHON="$PY" OUT="$LOGS/gpu_check" tools/gpu_check.sh ;;
    *) echo "unknown step '$step' (setup, test, bench, check)"; exit 2 ;;
    esac
done

say "summary ($("$PY" -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}")'), \
TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
failed=0
for name in make-test make-bench gpu-check; do
    [ -n "${STATUS[$name]:-}" ] || continue
    result=$(grep -E '[0-9]+ (passed|failed|skipped|deselected|errors?)\b.* in [0-9.]+s' "$LOGS/$name.log" | tail -1)
    printf '%-11s %-18s %4d min %02d s  %s\n' "$name" "${STATUS[$name]}" $((TIME[$name] / 60)) \
        $((TIME[$name] % 60)) "$result"
    [ "${STATUS[$name]}" == ok ] || failed=1
done
exit $failed
