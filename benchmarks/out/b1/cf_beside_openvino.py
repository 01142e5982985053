"""cpu-fused runner.infer alone vs right after plain OpenVINO calls (cpu_fused_bench's interleaving), and
fused.forward direct; per call index within a block of ITERS calls."""
import sys, time, json, numpy as np
from edgekit import runtime
cf_path, ov_path, rounds, iters = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cf = runtime.load(cf_path, threads=2); ov = runtime.load(ov_path, threads=2)
x = np.random.default_rng(0).standard_normal((1, *cf.input_shape)).astype(np.float32)
for _ in range(5): cf.infer(x); ov.infer(x)
blocks = {"ov": [], "cf_after_ov": [], "cf_after_cf": [], "forward_after_cf": []}
def block(fn):
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter(); fn(x); ts.append((time.perf_counter() - t0) * 1e3)
    return ts
for r in range(rounds):
    blocks["ov"].append(block(ov.infer))
    blocks["cf_after_ov"].append(block(cf.infer))
    blocks["cf_after_cf"].append(block(cf.infer))
    blocks["forward_after_cf"].append(block(cf.fused.forward))
for k, v in blocks.items():
    a = np.array(v)
    print(f"{k:17s} median {np.median(a):.3f} ms  first call of block {np.median(a[:,0]):.3f}  calls 2-3 {np.median(a[:,1:3]):.3f}  rest {np.median(a[:,3:]):.3f}  round medians {np.median(a,1).min():.2f}-{np.median(a,1).max():.2f}")
