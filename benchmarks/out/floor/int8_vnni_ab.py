"""RESULTS §14.6, an experiment (not kept): the cpu-fused INT8 1x1 with VNNI's vpdpbusd instead of vpmaddubsw +
vpmaddwd + vpaddd, against the int8 artifact's own library, fp32 and bf16, interleaved, on the same weights.

    git show d0e4f9d:edgekit/kernels/cpu/gmbinet_cpu.cpp > /tmp/cff/vnni.cpp && patch /tmp/cff/vnni.cpp int8_vnni_not_kept.patch
    python benchmarks/out/floor/int8_vnni_ab.py THREADS ROUNDS CALLS OUT.json
        # needs the artifacts /tmp/cff/cf, /tmp/cff/cf_int8, /tmp/cff/cf_bf16 of §14.6; builds /tmp/cff/libvnni.so
        # (the avx512 flags + -mavx512vnni); per op: 1 thread CPU time, 2 threads wall; min over calls, median over rounds
"""
import json, os, subprocess, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, "/work/wt/cf-floor")
from edgekit import runtime
from edgekit.kernels.cpu.build import CXX_FLAGS, find_compiler
from edgekit.kernels.cpu.runtime import ISA_LEVELS, CpuKernels, FusedNet

threads, rounds, calls, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lib = Path("/tmp/cff/libvnni.so")
if not lib.exists():
    subprocess.run([find_compiler(), *CXX_FLAGS, *ISA_LEVELS["avx512"][0], "-mavx512vnni", "-o", str(lib), "/tmp/cff/vnni.cpp", "-lpthread"], check=True)
nets = {}
for name, path in (("fp32", "/tmp/cff/cf"), ("int8", "/tmp/cff/cf_int8"), ("bf16", "/tmp/cff/cf_bf16")):
    nets[name] = runtime.load(path, threads=threads).fused
q = nets["int8"]
nets["int8_vnni"] = FusedNet(CpuKernels(lib, threads), q.net, q.params, q.offsets)
x = np.random.default_rng(0).standard_normal((1, 3, 512, 512)).astype(np.float32)
ref = nets["int8"].forward(x)
diff = float(np.abs(nets["int8_vnni"].forward(x) - ref).max())
layers = nets["fp32"].state(1, 512, 512)[3]
order = list(nets)
call_med = {k: [] for k in order}; op_min = {k: [] for k in order}
load0 = os.getloadavg()
for r in range(rounds):
    for k in (order if r % 2 == 0 else order[::-1]):
        cs, ops = [], []
        for _ in range(calls):
            tm = np.zeros(len(layers)); t0 = time.perf_counter()
            nets[k].forward(x, timings=tm, cpu_clock=threads == 1)
            cs.append((time.perf_counter() - t0) * 1e3); ops.append(tm)
        call_med[k].append(float(np.median(cs))); op_min[k].append(np.min(np.array(ops), axis=0))
load1 = os.getloadavg()
def grp(names):
    key = "+".join(names); return key.split("_")[0] if key.startswith("gmbi") else key
res = {"threads": threads, "rounds": rounds, "calls": calls, "load_before": load0, "load_after": load1,
       "max_abs_diff_int8_vnni_vs_int8": diff, "round_call_medians_ms": call_med, "per_group_ms_min_then_median": {}}
for k in order:
    med = np.median(np.array(op_min[k]), axis=0); g = {}
    for n, ms in zip(layers, med): g[grp(n)] = g.get(grp(n), 0.0) + float(ms)
    res["per_group_ms_min_then_median"][k] = g
print(f"threads {threads}, load {load0[0]:.2f} -> {load1[0]:.2f}, max |int8_vnni - int8| {diff:.2e}")
for k in order:
    g = res["per_group_ms_min_then_median"][k]
    print(f"{k:10s} call {np.median(call_med[k]):.2f} ms; ops sum {sum(g.values()):.2f}; " + " ".join(f"{a} {g[a]:.3f}" for a in ("gmbi2","gmbi3","gmbi4","gmbi5")))
for a, b in (("int8", "int8_vnni"), ("fp32", "int8_vnni"), ("int8_vnni", "bf16"), ("fp32", "int8")):
    rs = np.array(call_med[a]) / np.array(call_med[b])
    print(f"{b} vs {a}: {np.median(rs):.3f}x ({rs.min():.3f}-{rs.max():.3f})")
Path(out).write_text(json.dumps(res, indent=1))
