"""cpu-fused per kernel at several GMBINet widths (e.g. the widths `edgekit prune --exact` gives): the same kernel
library, GMBINets of the published depths with those widths, interleaved rounds, each op's time per round.

    python benchmarks/cpu_fused_widths_bench.py --widths 16,32,64,96,128 --widths 14,28,56,84,112 \
        --widths 12,24,48,72,96 --widths 8,16,32,48,64 [--checkpoint-for 14,28,56,84,112=PRUNED.pt] \
        [--isa avx512] [--threads 1] [--cpu-clock --stat min] [--rounds 7] [--calls 7] [--json OUT.json]

Speed does not depend on the weights, so a width without ``--checkpoint-for`` gets random weights (a pruned
checkpoint's own weights give the same times).  Reported per width: the median over rounds of the call median
(wall) and of each op's time (``--cpu-clock --stat min`` at 1 thread: each op's least disturbed CPU time, the
measure that survives a loaded machine), and the per-round ratio of the first width's call time to each
width's.  The library is built from this checkout's source for ``--isa``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_fused_ab import build, group_of  # noqa: E402


def model_for(widths, checkpoints):
    import torch

    from edgekit.models.checkpoint import load_checkpoint
    from edgekit.models.gmbinet import GMBINet, GMBINetConfig

    if widths in checkpoints:
        m = load_checkpoint(checkpoints[widths]).build().eval()
        assert tuple(m.config.widths) == widths, (m.config.widths, widths)
        return m
    torch.manual_seed(0)
    return GMBINet(GMBINetConfig(widths=widths)).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", action="append", required=True, help="five stage widths, comma-separated; first: the reference")
    ap.add_argument("--checkpoint-for", action="append", default=[], help="WIDTHS=CHECKPOINT: that checkpoint's weights")
    ap.add_argument("--isa", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=7)
    ap.add_argument("--cpu-clock", action="store_true")
    ap.add_argument("--stat", choices=("median", "min"), default="median")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from edgekit.kernels.cpu.runtime import CpuKernels, FusedNet, cpu_description, source_path, supported_isas
    from edgekit.kernels.fold import fold_gmbinet

    parse = lambda t: tuple(int(v) for v in t.split(","))  # noqa: E731
    widths = [parse(w) for w in args.widths]
    checkpoints = {parse(k): v for k, v in (c.split("=", 1) for c in args.checkpoint_for)}
    isa = args.isa or supported_isas()[0]
    with tempfile.TemporaryDirectory() as t:
        kernels = CpuKernels(build(source_path(), isa, Path(t) / "lib.so"), args.threads)
        nets, layers = {}, None
        for w in widths:
            net = fold_gmbinet(model_for(w, checkpoints), channel_multiple=1)
            blob, offsets = net.param_layout()
            nets[w] = FusedNet(kernels, net, blob, offsets)
            layers = nets[w].state(1, args.size, args.size)[3]
        x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
        for w in widths:
            out = nets[w].forward(x, poison=True)
            assert not np.isnan(out).any(), w
        load0 = os.getloadavg()
        call_med = {w: [] for w in widths}
        op_stat = {w: [] for w in widths}
        for r in range(args.rounds):
            for w in (widths if r % 2 == 0 else widths[::-1]):
                calls, ops = [], []
                for _ in range(args.calls):
                    tm = np.zeros(len(layers))
                    t0 = time.perf_counter()
                    nets[w].forward(x, timings=tm, cpu_clock=args.cpu_clock)
                    calls.append((time.perf_counter() - t0) * 1e3)
                    ops.append(tm)
                call_med[w].append(float(np.median(calls)))
                op_stat[w].append((np.min if args.stat == "min" else np.median)(np.array(ops), axis=0))
        load1 = os.getloadavg()
    ref = widths[0]
    rows = []
    for w in widths:
        med = np.median(np.array(op_stat[w]), axis=0)
        groups = {}
        for names, ms in zip(layers, med):
            groups[group_of(names)] = groups.get(group_of(names), 0.0) + float(ms)
        ratio = np.array(call_med[ref]) / np.array(call_med[w])
        rows.append({"widths": list(w), "checkpoint": checkpoints.get(w), "call_median_ms": float(np.median(call_med[w])),
                     "speed_vs_first_per_round": {"median": float(np.median(ratio)), "min": float(ratio.min()),
                                                  "max": float(ratio.max())},
                     "per_group_ms": groups, "sum_of_ops_ms": float(sum(groups.values()))})
    res = {"cpu": cpu_description(), "isa": isa, "threads": args.threads, "size": args.size, "rounds": args.rounds,
           "calls": args.calls, "cpu_clock": args.cpu_clock, "op_stat": args.stat, "loadavg_start": load0,
           "loadavg_end": load1, "rows": rows}
    print(f"{res['cpu']}, {isa}, {args.threads} threads, {args.size}^2; load {load0[0]:.1f} -> {load1[0]:.1f}; "
          f"per kernel: {'CPU' if args.cpu_clock else 'wall'} ms, {args.stat} over calls, median over rounds")
    names = list(rows[0]["per_group_ms"])
    print(f"{'widths':<22} " + " ".join(f"{n:>8}" for n in names) + "      sum   call(wall)  vs first")
    for row in rows:
        s = row["speed_vs_first_per_round"]
        print(f"{str(row['widths']):<22} " + " ".join(f"{row['per_group_ms'][n]:8.3f}" for n in names)
              + f" {row['sum_of_ops_ms']:8.2f} {row['call_median_ms']:10.2f}  {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
