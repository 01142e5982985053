import time, numpy as np, sys
from edgekit import runtime
r = runtime.load(sys.argv[1], threads=2)
x = np.random.default_rng(0).standard_normal((1, 3, 512, 512)).astype(np.float32)
r.infer(x)
real_run = r.kernels.run
r.kernels.run = lambda ops, timings=None, cpu_clock=False: None
r.kernels._take_nonfinite_real = r.kernels._take_nonfinite
def tm(fn, n=2000):
    ts=[]
    for _ in range(n):
        t0=time.perf_counter(); fn(); ts.append(time.perf_counter()-t0)
    return np.median(ts)*1e6
print("kernel_checks_finite", r.kernel_checks_finite)
print("infer without kernels   us", tm(lambda: r.infer(x)))
print("forward without kernels us", tm(lambda: r.fused.forward(x)))
print("forward+count w/o kern  us", tm(lambda: r.fused.forward(x, count_nonfinite=True)))
print("check_batch(finite=False) us", tm(lambda: r._check_batch(x, finite=False)))
print("check_batch(finite=True)  us", tm(lambda: r._check_batch(x, finite=True), 300))
plan, acts, ops, _ = r.fused.state(1,512,512)
r.kernels.run = real_run
print("ctypes ek_run on 0 ops us", tm(lambda: r.kernels.lib.ek_run(r.kernels._pool, ops, 0, None, 0)))
print("take_nonfinite us", tm(lambda: r.kernels.take_nonfinite()) if r.kernels.counts_nonfinite else None)
