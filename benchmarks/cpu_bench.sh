#!/usr/bin/env bash
# Produces the CPU tables in benchmarks/RESULTS.md: the published checkpoint compiled for every CPU
# backend (and every INT8 placement scheme), accuracy on the SD-900 test split, all rows timed in
# one interleaved `edgekit bench` run.
# Usage: bash benchmarks/cpu_bench.sh [OUT_DIR]   (needs ../shared; about 30 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${EDGEKIT_SHARED:-../shared}
CKPT="$SHARED/checkpoints/gmbinet_sd900_official.pt"
SD900="$SHARED/datasets/sd-saliency-900"
OUT=${1:-benchmarks/out}
A="$OUT/artifacts"
mkdir -p "$A"
build() {  # build NAME ARGS...: one artifact, parity measured on 16 SD-900 test images
  local name=$1; shift
  [ -f "$A/$name/manifest.json" ] || edgekit "$@" --out "$A/$name" --threads 2 --parity-data "$SD900"
}
build onnx_fp32        compile "$CKPT" --target onnx
build ort_fp32         compile "$CKPT" --target ort
build ov_default       compile "$CKPT" --target openvino --precision default
build ov_fp32          compile "$CKPT" --target openvino --precision fp32
build ov_bf16          compile "$CKPT" --target openvino --precision bf16
build ov_fp16          compile "$CKPT" --target openvino --precision fp16
for scheme in default stem-head-float conv-only pointwise; do
  build "ov_int8_$scheme" quantize "$CKPT" --target openvino --calib "$SD900" --subset 100 --int8-scheme "$scheme"
done
# NNCF accuracy control on top of the pointwise placement: reverts quantizers until the val-split
# IoU drop is <= 0.005 (about 10 minutes here: 26 quantizers ranked on the val split).
build ov_int8_pointwise_ac quantize "$CKPT" --target openvino --calib "$SD900" --subset 100 \
  --int8-scheme pointwise --max-drop 0.005 --metric iou --val "$SD900"
# The table (stdout) gives each row's spread over the rounds, ratios to the baseline marked "within
# noise" when their per-round spread contains 1.0, the precision OpenVINO ran (read back), the CPU and
# its ISA flags, and the load average; stage lines go to cpu_published.log.
edgekit bench "$CKPT" "$A"/ov_default "$A"/onnx_fp32 "$A"/ort_fp32 "$A"/ov_fp32 "$A"/ov_bf16 "$A"/ov_fp16 \
  "$A"/ov_int8_default "$A"/ov_int8_stem-head-float "$A"/ov_int8_conv-only "$A"/ov_int8_pointwise "$A"/ov_int8_pointwise_ac \
  --backends torch --device cpu --threads 2 --batch 1,8 --data "$SD900" --rounds 7 --iters 20 \
  --json "$OUT/cpu_published.json" 2> "$OUT/cpu_published.log" | tee "$OUT/cpu_published.txt"
