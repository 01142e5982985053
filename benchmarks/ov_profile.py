"""Where an OpenVINO artifact spends its time: per-op-type totals from OpenVINO's own counters.

    python benchmarks/ov_profile.py ARTIFACT [ARTIFACT...] [--runs 20] [--threads 2]

Each artifact is compiled as the openvino runner does (its recorded precision hint, static batch 1,
LATENCY, one stream); the artifacts are run in interleaved rounds and the per-op-type times are
averaged, so their breakdowns are comparable within one run.
"""
import argparse
import collections

import numpy as np

from edgekit import runtime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    runners = []
    for a in args.artifacts:
        r = runtime.load(a, threads=args.threads)
        r.config["PERF_COUNT"] = True
        r.compiled(1)
        runners.append((a, r))
    x = np.random.default_rng(0).standard_normal((1, *runners[0][1].input_shape)).astype(np.float32)
    stats = {a: collections.Counter() for a, _ in runners}
    counts = {a: collections.Counter() for a, _ in runners}
    for i in range(args.runs + 3):
        for a, r in runners:
            req = r._requests[1]
            req.infer({0: x})
            if i < 3:
                continue  # warm-up
            for p in req.profiling_info:
                key = f"{p.node_type} [{p.exec_type}]"
                stats[a][key] += p.real_time.total_seconds() * 1e3 / args.runs
                counts[a][key] += 1 / args.runs
    for a, _ in runners:
        print(f"\n{a}: {sum(stats[a].values()):.2f} ms per image")
        for key, ms in stats[a].most_common(10):
            print(f"  {ms:7.2f} ms  {counts[a][key]:4.0f} ops  {key}")


if __name__ == "__main__":
    main()
