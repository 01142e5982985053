#!/bin/bash
cd /work/wt/anywidth
export PATH=/work/venvs/anywidth/bin:$PATH
SD=../shared/datasets/sd-saliency-900; P=/tmp/aw/ck; A=/tmp/aw/art; OUT=benchmarks/out/anywidth
uptime
ROWS=($A/gmbinet_sd900_official_ov $A/gmbinet_sd900_official_cf $A/gmbinet_exact0.125_ov $A/gmbinet_exact0.125_cf)
for R in 0.25 0.5; do
  c=$P/gmbinet_exact$R.pt; n=$(basename $c .pt)
  # openvino default (bf16 on this AMX CPU) misses the parity budget for these pruned, not fine-tuned models: fp32 instead
  edgekit compile $c --target openvino --precision fp32 --out $A/${n}_ovfp32 --threads 2 --parity-data synthetic:2 --force || exit 1
  edgekit compile $c --target cpu-fused --out $A/${n}_cf --threads 2 --parity-data synthetic:2 --force || exit 1
  ROWS+=($A/${n}_ovfp32 $A/${n}_cf)
done
uptime
edgekit bench "${ROWS[@]}" --device cpu --threads 2 --batch 1 --data $SD --rounds 5 --iters 10 --json $OUT/bench.json
uptime
