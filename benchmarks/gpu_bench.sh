#!/usr/bin/env bash
# The GPU table of benchmarks/RESULTS.md section 5, on one GPU machine (written for the offline H100:
# Python 3.12, torch + CUDA, no TensorRT, no PyCUDA; see ../shared/GPU.md). NOT YET RUN: no GPU was
# lent to the session that wrote it.
#
# Usage (from the repository root, on the GPU machine):
#   CKPT=path/to/gmbinet_sd900_official.pt DATA=path/to/sd-saliency-900 bash benchmarks/gpu_bench.sh [OUT_DIR]
# ../shared is not on the GPU machine: copy the checkpoint and the SD-900 folder (or its test images)
# next to the code first. Without DATA the accuracy columns use the synthetic generator.
# MAX_AUTOTUNE=1 adds mode="max-autotune" to the torch.compile rows (about 4 minutes per batch size).
# TensorRT rows appear when `import tensorrt` works there (engines are compiled into
# $EDGEKIT_CACHE/bench first); cuda-fused rows when that backend (PyCUDA) is available.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${EDGEKIT_SHARED:-../shared}
CKPT=${CKPT:-$SHARED/checkpoints/gmbinet_sd900_official.pt}
DATA=${DATA:-$SHARED/datasets/sd-saliency-900}
OUT=${1:-benchmarks/out}
mkdir -p "$OUT"
[ -d "$DATA" ] || DATA=synthetic:32
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # no install needed on the offline machine
EXTRA=()
[ "${MAX_AUTOTUNE:-0}" = 1 ] && EXTRA+=(--max-autotune)
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader || true
python3 -m edgekit.cli bench "$CKPT" --device gpu --batch 1,32 --data "$DATA" --rounds 7 --iters 50 \
  "${EXTRA[@]}" --json "$OUT/gpu_published.json" | tee "$OUT/gpu_published.txt"
