#!/usr/bin/env bash
# Self-test of the CUDA code paths, then the Table 1 `gpu` preset.
#
#   scripts/gpu-check.sh OUT_DIR [REPRODUCE_ARGS...]            # on a CUDA machine
#   scripts/gpu-check.sh --dry-run OUT_DIR [REPRODUCE_ARGS...]  # on the CPU, tiny (CI, no GPU)
#
# 1. `python -m abnn.gpucheck OUT_DIR`: bf16 training steps, fp16 with the grad scaler,
#    torch.compile, channels-last, the on-device loader, a one-process NCCL group with an
#    all-reduce, a measured throughput; each recorded passed/failed/skipped in OUT_DIR/gpu_check.json.
# 2. `abnn reproduce table1 --preset gpu --out OUT_DIR/table1` (results.json, report.md, figures).
#    --dry-run: on the CPU with tiny --set overrides and needs_cuda=false (checks the pipeline,
#    its accuracies mean nothing).
# The data comes from $ABNN_DATA_ROOT (or pass --data-root DIR after OUT_DIR). Python: $PYTHON
# (default: python3). Exit status: non-zero when a check or the reproduction failed; the
# reproduction runs even when a check failed.
set -uo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
fi
if [[ $# -lt 1 ]]; then
    echo "usage: scripts/gpu-check.sh [--dry-run] OUT_DIR [REPRODUCE_ARGS...]" >&2
    exit 2
fi
out=$1
shift
py=${PYTHON:-python3}
mkdir -p "$out" || exit 2

check_args=("$out")
reproduce_args=(reproduce table1 --preset gpu --out "$out/table1" --no-progress)
if [[ $dry_run == 1 ]]; then
    check_args+=(--dry-run)
    tiny=(needs_cuda=false width=1/16 substitute_width=1/16 epochs=1 substitute_epochs=1 batch_size=32
          train_size=64 substitute_train_size=64 val_size=8 robust_val_size=8 n_eval=8 eval_batch_size=8
          roa_stride=8 n_examples=2)
    for kv in "${tiny[@]}"; do reproduce_args+=(--set "$kv"); done
    reproduce_args+=(--device cpu --jobs 1 --threads 1)
else
    reproduce_args+=(--device cuda)
fi

status=0
"$py" -m abnn.gpucheck "${check_args[@]}" || status=1
"$py" -m abnn.cli "${reproduce_args[@]}" "$@" || status=1
exit $status
