"""runner.infer vs fused.forward for two artifacts, interleaved blocks."""
import sys, time, numpy as np
from edgekit import runtime
arts = sys.argv[1:3]; rounds = int(sys.argv[3]); iters = int(sys.argv[4])
rs = [runtime.load(a, threads=2) for a in arts]
x = np.random.default_rng(0).standard_normal((1, *rs[0].input_shape)).astype(np.float32)
for r in rs:
    for _ in range(5): r.infer(x)
modes = {}
for i, r in enumerate(rs):
    modes[f"{i}:infer"] = r.infer
    modes[f"{i}:forward"] = r.fused.forward
    if r.kernel_checks_finite:
        modes[f"{i}:forward_count"] = lambda x, r=r: r.fused.forward(x, count_nonfinite=True)
    modes[f"{i}:check_then_forward"] = lambda x, r=r: (r._check_finite(x), r.fused.forward(x))
res = {k: [] for k in modes}
for rnd in range(rounds):
    for k, fn in modes.items():
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter(); fn(x); ts.append((time.perf_counter() - t0) * 1e3)
        res[k].append(ts)
for k, v in res.items():
    a = np.array(v); m = np.median(a, 1)
    print(f"{k:22s} median {np.median(a):.3f} ms  rounds {m.min():.2f}-{m.max():.2f}")
