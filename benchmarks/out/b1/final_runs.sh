#!/bin/bash
# final timing set: waits for an idle machine, then each run under the shared lock
cd /work/wt/cf-b1
PY=/work/venvs/cf-b1/bin/python
O=benchmarks/out/b1
run() { local name=$1; shift
  bash /tmp/cfb1/waitidle.sh 240
  echo "== $name: before $(uptime)"
  flock /work/notes/bench.lock "$@" 2>&1 | tail -${TAILN:-8}
  echo "== $name: after $(uptime)"; }
run 2t_a $PY benchmarks/cpu_fused_bench.py --baseline ov_default=/tmp/s5c/ov_default --row cf_fp32_before=/tmp/s5c/cf --row cf_fp32_kcheck=/tmp/cfb1/cf_fp32_kcheck --row cf_bf16_before=/tmp/s5c/cf_bf16_owned3 --row cf_bf16_kcheck=/tmp/cfb1/cf_bf16_kcheck --rounds 9 --iters 15 --threads 2 --json $O/bench_2t_b1_final1.json
run 2t_b_swapped $PY benchmarks/cpu_fused_bench.py --baseline ov_default=/tmp/s5c/ov_default --row cf_bf16_kcheck=/tmp/cfb1/cf_bf16_kcheck --row cf_bf16_before=/tmp/s5c/cf_bf16_owned3 --row cf_fp32_kcheck=/tmp/cfb1/cf_fp32_kcheck --row cf_fp32_before=/tmp/s5c/cf --rounds 9 --iters 15 --threads 2 --json $O/bench_2t_b1_final2_swapped.json
run 1t_b8 $PY benchmarks/cpu_fused_bench.py --baseline ov_default_1t=/tmp/s5c/ov_default:threads=1 --row cf_bf16_before_1t=/tmp/s5c/cf_bf16_owned3:threads=1 --row cf_bf16_kcheck_1t=/tmp/cfb1/cf_bf16_kcheck:threads=1 --row ov_default_b8=/tmp/s5c/ov_default:batch=8 --row cf_bf16_before_b8=/tmp/s5c/cf_bf16_owned3:batch=8 --row cf_bf16_kcheck_b8=/tmp/cfb1/cf_bf16_kcheck:batch=8 --rounds 7 --iters 10 --json $O/bench_1t_b8_final.json
TAILN=9 run ab_2t $PY benchmarks/cpu_fused_ab.py ../shared/checkpoints/gmbinet_sd900_official.pt --a d0e4f9d --b WORKTREE --isa avx512amx --threads 2 --rounds 9 --calls 15 --json $O/ab_kcheck_2t_final.json
TAILN=9 run ab_1t $PY benchmarks/cpu_fused_ab.py ../shared/checkpoints/gmbinet_sd900_official.pt --a d0e4f9d --b WORKTREE --isa avx512amx --threads 1 --cpu-clock --stat min --rounds 7 --calls 7 --json $O/ab_kcheck_1t_cpu_min.json
TAILN=9 run overhead $PY /tmp/cfb1/ab_runner.py /tmp/s5c/cf_bf16_owned3 /tmp/cfb1/cf_bf16_kcheck 9 15
TAILN=9 run beside_ov $PY /tmp/cfb1/beside_ov.py /tmp/cfb1/cf_bf16_kcheck /tmp/s5c/ov_default 9 15
