# 2 threads: GMBI banded modules cut into 2 bands per thread (current) vs 1 band per thread (less halo recompute)
import time, statistics, numpy as np
from edgekit import runtime
from edgekit.kernels.cpu import runtime as R
orig = R.band_rows
def one_per_thread(kind, n, rows, width, pc, threads, panel_bytes=R.PANEL_BYTES):
    if kind == "gmbi":
        per_image = max(1, -(-threads // n))
        return max(min(rows, 8), -(-rows // per_image))
    return orig(kind, n, rows, width, pc, threads, panel_bytes)
x = np.random.default_rng(0).standard_normal((1, 3, 512, 512)).astype(np.float32)
A = runtime.load("/tmp/s5b/cf_bf16_fp16chain", threads=2)
R.band_rows = one_per_thread
B = runtime.load("/tmp/s5b/cf_bf16_fp16chain", threads=2)
R.band_rows = orig
ya, yb = A.infer(x), B.infer(x)
print("max |B-A|", float(np.abs(np.asarray(ya) - np.asarray(yb)).max()))
ratios, ma, mb = [], [], []
for rnd in range(9):
    ta, tb = [], []
    for r in (A, B) if rnd % 2 == 0 else (B, A):
        for _ in range(15):
            t0 = time.perf_counter(); r.infer(x); dt = time.perf_counter() - t0
            (ta if r is A else tb).append(dt * 1e3)
    ma.append(statistics.median(ta)); mb.append(statistics.median(tb)); ratios.append(ma[-1] / mb[-1])
print("A (2 bands/thread) %.2f ms, B (1 band/thread) %.2f ms, A/B %.3f (%.3f-%.3f)" % (statistics.median(ma), statistics.median(mb), statistics.median(ratios), min(ratios), max(ratios)))
