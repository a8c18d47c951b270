#!/usr/bin/env bash
# Kiln's GPU paths on a CUDA machine, in one go, within 8 minutes, ending in one table:
#
#   1. install   the CUDA build of torch (skipped when torch already sees a GPU), and
#                nvidia-ml-py for the GPU metrics
#   2. gpu tests the `gpu`-marked tests (pytest -m gpu)
#   3. kiln      `kiln run` on this host: a mixed-precision train job on the GPU
#                (precision auto: bf16 where supported, else fp16 with a grad scaler), a
#                GPU batch_predict against a raw GPU loop over the same rows (ratio and
#                NVML utilisation of each), and the worker host's GPU metrics scrape
#   4. ddp       torch.distributed with NCCL, one rank: all_reduce and one DDP step
#                (Kiln runs DDP only for `gpus: N > 1`, so one GPU checks NCCL itself)
#
#   bench/gpu_check.sh                      # from the repository root
#   GPU_CHECK_ROWS=200000 bench/gpu_check.sh
#
# Settings (environment): PYTHON (default: python3), TORCH_INDEX_URL (default: PyTorch's
# cu124 wheels), PIP_FIND_LINKS (a folder of wheels for a machine without the internet),
# GPU_CHECK_ROWS (rows of the batch comparison, default 1000000).
# Exit codes: 0 every step passed, 1 a step failed or timed out, 3 no CUDA device here.

set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu124}
ROWS=${GPU_CHECK_ROWS:-1000000}
# Seconds per step: 150 + 90 + 200 + 30 = 470, under the 8 minutes (480 s) allowed.
INSTALL_S=150 TESTS_S=90 KILN_S=200 DDP_S=30

SUMMARY=$(mktemp)
trap 'rm -f "$SUMMARY"' EXIT

note() { printf '%s|%s|%s\n' "$1" "$2" "$3" >>"$SUMMARY"; }

# Runs "$@" under `timeout SECONDS`; records a timeout or a failure as step NAME.
guarded() {
    local name=$1 seconds=$2 code
    shift 2
    timeout --signal=TERM --kill-after=10 "$seconds" "$@"
    code=$?
    if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
        note "$name" FAIL "timed out after ${seconds}s"
    fi
    return "$code"
}

# --- 0. is there a GPU at all? -----------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "gpu_check: no CUDA device here (nvidia-smi is missing or lists no GPU); nothing checked." >&2
    echo "gpu_check: run it on a machine with an NVIDIA GPU and its driver." >&2
    exit 3
fi
GPU_NAME=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1)
echo "gpu_check: $GPU_NAME" >&2

# --- 1. install ----------------------------------------------------------------------------
# Run as `bash -c install` (exported), so that `timeout` can bound it like the other steps.
# shellcheck disable=SC2329
install() {
    if "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "gpu_check: torch already sees the GPU; not reinstalling it" >&2
    else
        "$PYTHON" -m pip install -q --force-reinstall --no-deps torch --index-url "$TORCH_INDEX_URL" || return 1
    fi
    # Kiln and its test tools, unless there already (torch, satisfied above, is kept).
    "$PYTHON" -c 'import celery, flask, sqlalchemy, pytest, kiln' 2>/dev/null ||
        "$PYTHON" -m pip install -q -e '.[ops,dev]' || return 1
    "$PYTHON" -m pip install -q nvidia-ml-py || return 1
    "$PYTHON" -c 'import torch; assert torch.cuda.is_available(); print(torch.__version__, torch.version.cuda)'
}
export -f install
export PYTHON TORCH_INDEX_URL
if out=$(guarded install "$INSTALL_S" bash -c install 2>&1); then
    note install ok "torch $(tail -n 1 <<<"$out")"
else
    grep -q '^install|' "$SUMMARY" || note install FAIL "$(tail -n 1 <<<"$out")"
fi

# --- 2. gpu-marked tests -------------------------------------------------------------------
if out=$(guarded gpu_tests "$TESTS_S" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/unit 2>&1); then
    note gpu_tests ok "$(tail -n 1 <<<"$out")"
else
    grep -q '^gpu_tests|' "$SUMMARY" || note gpu_tests FAIL "$(tail -n 1 <<<"$out")"
fi

# --- 3 and 4. Kiln on the GPU, then NCCL -----------------------------------------------------
for step in kiln ddp; do
    seconds=$KILN_S
    [ "$step" = ddp ] && seconds=$DDP_S
    out=$(guarded "$step" "$seconds" "$PYTHON" bench/gpu_check.py "$step" --rows "$ROWS" 2>&1)
    grep '^RESULT|' <<<"$out" | cut -d'|' -f2- >>"$SUMMARY"
    if ! grep -q '^RESULT|' <<<"$out" && ! grep -q "^$step|" "$SUMMARY"; then
        note "$step" FAIL "$(tail -n 1 <<<"$out")"
    fi
done

# --- summary -------------------------------------------------------------------------------
echo
printf '%-16s %-6s %s\n' STEP STATUS DETAIL
printf '%-16s %-6s %s\n' ---- ------ ------
while IFS='|' read -r name status detail; do
    printf '%-16s %-6s %s\n' "$name" "$status" "$detail"
done <"$SUMMARY"

if grep -q '|FAIL|' "$SUMMARY"; then
    exit 1
fi
exit 0
