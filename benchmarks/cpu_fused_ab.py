"""Two versions of the cpu-fused kernel source on the same folded weights: interleaved rounds, whole-call and
per-kernel times, so a kernel change is kept or dropped on a measurement taken under the same machine state.

    python benchmarks/cpu_fused_ab.py CKPT --a REV_OR_FILE --b REV_OR_FILE [--isa avx512] [--threads 2]
        [--size 512] [--rounds 9] [--calls 15] [--json OUT.json]

``--a`` / ``--b``: a git revision (its ``edgekit/kernels/cpu/gmbinet_cpu.cpp``) or a path to a source file;
``WORKTREE`` is the file in this checkout.  Both are compiled with the artifact's flags for ``--isa`` (B with
``--b-isa`` when given: two ISA levels of one source, e.g. ``--isa avx512 --b-isa avx512amx``) into a
temporary folder and must have the same kernel ABI (the op records are built once, by this edgekit).  Each round
runs ``--calls`` forward passes of A then B (B then A in odd rounds) on one fixed input; per round the median
call and the median of each op's time.  Reported: the median over rounds of those, and the per-round ratio
A / B of the call medians (median, min-max).  ``--cpu-clock --stat min --threads 1``: each op's least
disturbed CPU time, the per-kernel measure that survives a loaded machine.  The machine is shared: say its load average with the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "edgekit/kernels/cpu/gmbinet_cpu.cpp"


def source_file(spec: str, tmp: Path, tag: str) -> Path:
    if spec == "WORKTREE":
        return ROOT / SOURCE
    if Path(spec).is_file():
        return Path(spec)
    out = tmp / f"{tag}.cpp"
    out.write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{spec}:{SOURCE}"], check=True,
                                   capture_output=True).stdout)
    return out


def build(src: Path, isa: str, out: Path) -> Path:
    from edgekit.kernels.cpu.build import CXX_FLAGS, find_compiler
    from edgekit.kernels.cpu.runtime import ISA_LEVELS

    subprocess.run([find_compiler(), *CXX_FLAGS, *ISA_LEVELS[isa][0], "-o", str(out), str(src), "-lpthread"], check=True)
    return out


def group_of(names) -> str:
    key = "+".join(names)
    return key.split("_")[0] if key.startswith("gmbi") else key


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--isa", default=None, help="avx2 or avx512 (default: the fastest this CPU runs)")
    ap.add_argument("--b-isa", default=None, help="B's ISA level (default: --isa)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--cpu-clock", action="store_true",
                    help="per-op times as the calling thread's CPU time (robust to preemption; meaningful at --threads 1)")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="per round, each op's median or minimum over the calls (min: the least disturbed call)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from edgekit.kernels.cpu.runtime import CpuKernels, FusedNet, cpu_description, supported_isas
    from edgekit.kernels.fold import fold_gmbinet
    from edgekit.models.checkpoint import load_checkpoint

    isa = args.isa or supported_isas()[0]
    model = load_checkpoint(args.checkpoint).build().eval()
    net = fold_gmbinet(model, channel_multiple=1)
    blob, offsets = net.param_layout()
    x = np.random.default_rng(0).standard_normal((args.batch, net.in_channels, args.size, args.size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        nets = {}
        for tag, spec, level in (("A", args.a, isa), ("B", args.b, args.b_isa or isa)):
            lib = build(source_file(spec, tmp, tag), level, tmp / f"lib_{tag}.so")
            nets[tag] = FusedNet(CpuKernels(lib, args.threads), net, blob, offsets)
        ref = nets["A"].forward(x)
        diff = float(np.abs(nets["B"].forward(x) - ref).max())
        layers = nets["A"].state(args.batch, args.size, args.size)[3]
        load0 = os.getloadavg()
        call_med = {k: [] for k in nets}
        op_med = {k: [] for k in nets}
        for r in range(args.rounds):
            for tag in (("A", "B") if r % 2 == 0 else ("B", "A")):
                calls, ops = [], []
                for _ in range(args.calls):
                    tm = np.zeros(len(layers))
                    t0 = time.perf_counter()
                    nets[tag].forward(x, timings=tm, cpu_clock=args.cpu_clock)
                    calls.append((time.perf_counter() - t0) * 1e3)
                    ops.append(tm)
                call_med[tag].append(float(np.median(calls)))
                op_med[tag].append((np.min if args.stat == "min" else np.median)(np.array(ops), axis=0))
        load1 = os.getloadavg()
    ratios = np.array(call_med["A"]) / np.array(call_med["B"])
    groups = {}
    for tag in nets:
        med = np.median(np.array(op_med[tag]), axis=0)
        g = {}
        for names, ms in zip(layers, med):
            g[group_of(names)] = g.get(group_of(names), 0.0) + float(ms)
        groups[tag] = g
    res = {"cpu": cpu_description(), "isa": isa, "b_isa": args.b_isa or isa, "threads": args.threads, "size": args.size, "batch": args.batch,
           "rounds": args.rounds, "calls": args.calls, "cpu_clock": args.cpu_clock, "op_stat": args.stat, "a": args.a, "b": args.b, "max_abs_diff_b_vs_a": diff,
           "loadavg_start": load0, "loadavg_end": load1,
           "call_median_ms": {k: float(np.median(v)) for k, v in call_med.items()},
           "round_medians_ms": call_med, "a_over_b": {"median": float(np.median(ratios)),
                                                       "min": float(ratios.min()), "max": float(ratios.max())},
           "per_group_median_ms": groups}
    print(f"{res['cpu']}, {isa}{' vs ' + args.b_isa if args.b_isa else ''}, {args.threads} threads, {args.batch}x{args.size}^2; load {load0[0]:.1f} -> {load1[0]:.1f}")
    print(f"max |B - A| {diff:.2e}")
    for k in nets:
        print(f"{k} ({getattr(args, k.lower())}): median call {res['call_median_ms'][k]:.2f} ms "
              f"(rounds {min(call_med[k]):.2f}-{max(call_med[k]):.2f})")
    a = res["a_over_b"]
    print(f"A / B per round: {a['median']:.3f} ({a['min']:.3f}-{a['max']:.3f})")
    print(f"per kernel, ms ({'CPU' if args.cpu_clock else 'wall'} time, {args.stat} over calls, median over rounds):")
    print("kernel " + " ".join(f"{g:>9}" for g in groups["A"]))
    for k in nets:
        print(f"{k:<6} " + " ".join(f"{groups[k][g]:9.3f}" for g in groups["A"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
