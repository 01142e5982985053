# the two-phase threshold: current (64: stages 3-5 two-phase) vs 128 (stage 2 two-phase too: owned lanes at 2 threads)
import sys, time, statistics, numpy as np
from edgekit import runtime
from edgekit.kernels.cpu import runtime as R
threads = int(sys.argv[1]); art = sys.argv[2]
x = np.random.default_rng(0).standard_normal((1, 3, 512, 512)).astype(np.float32)
runners = {}
for thr in (64, 128):
    R.GMBI_TWO_PHASE_MAX_ROWS = thr
    runners[thr] = runtime.load(art, threads=threads)
R.GMBI_TWO_PHASE_MAX_ROWS = 64
ref = np.asarray(runners[64].infer(x))
for k, r in runners.items(): print(k, "max |diff| vs 64:", float(np.abs(np.asarray(r.infer(x)) - ref).max()))
med = {k: [] for k in runners}
for rnd in range(9):
    order = list(runners) if rnd % 2 == 0 else list(runners)[::-1]
    for k in order:
        ts = []
        for _ in range(15):
            t0 = time.perf_counter(); runners[k].infer(x); ts.append((time.perf_counter() - t0) * 1e3)
        med[k].append(statistics.median(ts))
for k in runners:
    rat = [a / b for a, b in zip(med[64], med[k])]
    print("threshold %2d: %.2f ms (rounds %.2f-%.2f), 64 / this per round %.3f (%.3f-%.3f)" % (k, statistics.median(med[k]), min(med[k]), max(med[k]), statistics.median(rat), min(rat), max(rat)))
