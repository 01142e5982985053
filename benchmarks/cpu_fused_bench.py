"""cpu-fused against plain OpenVINO: interleaved rounds on one machine, spread reported, per-kernel timings.

    python benchmarks/cpu_fused_bench.py --baseline OV_DEFAULT_ARTIFACT --row NAME=ARTIFACT[:threads=N][:batch=B][:isa=avx2][:batch_path=whole] ...
        [--rounds 9] [--iters 15] [--threads 2] [--kernels CPU_FUSED_ARTIFACT ...] [--json OUT.json]

Every row is loaded with ``edgekit.runtime.load(path, threads=...)`` and timed through ``infer`` (the call an
application makes), on one fixed preprocessed SD-900-sized input.  Each round runs every row ``--iters`` times
in turn (rows interleaved, so machine noise hits them alike); per row we report the median latency over all
calls, the min and max of the per-round medians, and FPS (batch / latency).  Ratios vs the baseline are taken
per round (same round, same noise) and reported as the median with min/max over rounds; a ratio whose
min-max range contains 1.0 is marked "within noise".

``--kernels`` (repeatable): per-kernel wall times of each cpu-fused artifact named (median over calls of each op's time), and the
physical limit: the network's MACs at the FMA peak of the cores used.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from edgekit import runtime


def parse_row(text: str):
    name, _, rest = text.partition("=")
    parts = rest.split(":")
    opts = dict(p.split("=", 1) for p in parts[1:])
    return {"name": name, "path": parts[0], "threads": int(opts.get("threads", 0)) or None,
            "batch": int(opts.get("batch", 1)), "isa": opts.get("isa"), "batch_path": opts.get("batch_path")}


def cpu_info() -> dict:
    from edgekit.kernels.cpu.runtime import cpu_description, cpu_features

    feats = cpu_features()
    return {"model": cpu_description(), "logical_cpus": len(__import__("os").sched_getaffinity(0)),
            "isa_flags": [f for f in ("SSE42", "AVX", "AVX2", "FMA3", "F16C", "AVX512F", "AVX512_SKX", "AVX512VNNI",
                                      "AVX512_BF16", "AMX_TILE") if feats.get(f)],
            "platform": platform.platform()}


def bench(rows, baseline, rounds: int, iters: int, threads: int, log):
    runners = {}
    for r in [baseline, *rows]:
        # cpu-fused: one of the artifact's ISA libraries; how a batch of 2+ runs (stream, serial, whole)
        extra = {k: r[k] for k in ("isa", "batch_path") if r.get(k)}
        runner = runtime.load(r["path"], threads=r["threads"] or threads, **extra)
        x = np.random.default_rng(0).standard_normal((r["batch"], *runner.input_shape)).astype(np.float32)
        for _ in range(3):
            runner.infer(x)  # warm-up: plans, compiled models, caches
        runners[r["name"]] = (runner, x, r)
        log(f"loaded {r['name']}: {runner.describe()}")
    lat = {name: [] for name in runners}
    round_medians = {name: [] for name in runners}
    for k in range(rounds):
        for name, (runner, x, _) in runners.items():
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter()
                runner.infer(x)
                ts.append((time.perf_counter() - t0) * 1e3)
            lat[name] += ts
            round_medians[name].append(statistics.median(ts))
        log(f"round {k + 1}/{rounds}: " + ", ".join(f"{n} {round_medians[n][-1]:.1f} ms" for n in runners))
    base = baseline["name"]
    out = []
    for name, (runner, x, r) in runners.items():
        med = statistics.median(lat[name])
        fps_rounds = [r["batch"] * 1e3 / m for m in round_medians[name]]
        base_fps = [baseline["batch"] * 1e3 / m for m in round_medians[base]]
        ratios = [a / b for a, b in zip(fps_rounds, base_fps)]
        row = {"name": name, "path": r["path"], "runner": runner.describe(), "batch": r["batch"],
               "threads": r["threads"] or threads, "calls": len(lat[name]), "median_ms": med,
               "round_median_ms_min": min(round_medians[name]), "round_median_ms_max": max(round_medians[name]),
               "round_medians_ms": round_medians[name],  # per round: ratios against any other row of the run
               "fps": r["batch"] * 1e3 / med, "vs_baseline_median": statistics.median(ratios),
               "vs_baseline_min": min(ratios), "vs_baseline_max": max(ratios)}
        row["within_noise"] = name != base and row["vs_baseline_min"] <= 1.0 <= row["vs_baseline_max"]
        if len(lat[name]) >= 100:  # no p99 from fewer than 100 samples
            row["p99_ms"] = float(np.percentile(lat[name], 99))
        out.append(row)
    return out


def kernel_profile(path: str, threads: int, calls: int) -> dict:
    runner = runtime.load(path, threads=threads)
    x = np.random.default_rng(0).standard_normal((1, *runner.input_shape)).astype(np.float32)
    fused = runner.fused
    plan, _, ops, layers = fused.state(1, *runner.input_shape[1:])
    fused.forward(x)
    per_call = []
    for _ in range(calls):
        t = np.zeros(len(ops))
        fused.forward(x, timings=t)
        per_call.append(t)
    per_call = np.array(per_call)
    med = np.median(per_call, axis=0)
    groups = {}
    for names, ms in zip(layers, med):
        key = "+".join(names)
        key = key.split("_")[0] if key.startswith("gmbi") else key
        groups[key] = groups.get(key, 0.0) + float(ms)
    return {"artifact": path, "threads": threads, "calls": calls, "isa": runner.isa,
            "per_op_median_ms": {"+".join(n): float(m) for n, m in zip(layers, med)},
            "per_group_median_ms": groups, "sum_of_op_medians_ms": float(med.sum())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="NAME=ARTIFACT of the baseline row, or a path")
    ap.add_argument("--row", action="append", default=[], help="NAME=ARTIFACT[:threads=N][:batch=B][:isa=avx2|avx512]"
                    "[:batch_path=stream|serial|whole]")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernels", action="append", default=[],
                    help="a cpu-fused artifact to profile per kernel (repeat for several: profiled in turn)")
    ap.add_argument("--kernel-calls", type=int, default=40)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    baseline = parse_row(args.baseline if "=" in args.baseline else f"baseline={args.baseline}")
    rows = [parse_row(r) for r in args.row]
    res = {"command": " ".join(["python", "benchmarks/cpu_fused_bench.py", *(argv or sys.argv[1:])]),
           "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_info(),
           "rounds": args.rounds, "iters": args.iters, "baseline": baseline["name"],
           "rows": bench(rows, baseline, args.rounds, args.iters, args.threads, log)}
    if args.kernels:
        res["kernels"] = [kernel_profile(path, t, args.kernel_calls) for path in args.kernels
                          for t in sorted({1, args.threads})]
    print(f"{'row':<28} {'batch':>5} {'thr':>3} {'median ms':>9} {'round med min-max':>18} {'FPS':>7} "
          f"{'vs baseline (min-max)':>24}")
    for r in res["rows"]:
        noise = " within noise" if r["within_noise"] else ""
        print(f"{r['name']:<28} {r['batch']:>5} {r['threads']:>3} {r['median_ms']:>9.2f} "
              f"{r['round_median_ms_min']:>8.2f}-{r['round_median_ms_max']:<8.2f} {r['fps']:>7.1f} "
              f"{r['vs_baseline_median']:>6.2f}x ({r['vs_baseline_min']:.2f}-{r['vs_baseline_max']:.2f}){noise}")
    for k in res.get("kernels", []):
        print(f"\nper-kernel median ms, {k['artifact']}, {k['threads']} thread(s), {k['isa']}: " +
              ", ".join(f"{g} {ms:.2f}" for g, ms in k["per_group_median_ms"].items()) +
              f"; sum {k['sum_of_op_medians_ms']:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
