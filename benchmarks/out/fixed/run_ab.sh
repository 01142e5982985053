#!/bin/sh
# One timing run of 14.8 under the shared lock: uptime before/after, one interleaved A/B.
# usage: run_ab.sh A B JSON_NAME [extra cpu_fused_ab args]
set -e
cd "$(dirname "$0")/../../.."
A=$1; B=$2; NAME=$3; shift 3
CK=../shared/checkpoints/gmbinet_sd900_official.pt
O=benchmarks/out/fixed
echo "before: $(uptime)"
/work/venvs/cf-fixed/bin/python benchmarks/cpu_fused_ab.py $CK --a $A --b $B --isa avx512amx --threads 2 \
    --rounds 9 --calls 15 --json $O/$NAME.json "$@"
echo "after: $(uptime)"
