import resource, sys, numpy as np
from edgekit import runtime
art, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
mib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
r = runtime.load(art, threads=threads, batch_path=path)
x = np.random.default_rng(0).standard_normal((8, 3, 512, 512), dtype=np.float32)  # 24 MiB input
r0 = mib()
r.infer(x[:1]); r1 = mib()
y = r.infer(x); r8 = mib()
print(f"{art} {path} T={threads}: after load+input {r0:.0f} MiB, after batch 1 {r1:.0f} MiB, after batch 8 {r8:.0f} MiB (+{r8 - r1:.0f})")
