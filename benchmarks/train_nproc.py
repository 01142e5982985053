"""Training throughput with 1 vs N processes at the same global batch (``edgekit train --nproc``).

    python benchmarks/train_nproc.py --nproc 1,2 --rounds 2 --size 128 --batch 8 --iterations 30

Runs the project's recipe (cpu profile, shrunk to --size/--batch, validation every 10 iterations) on
synthetic data, alternating the process counts round by round so drift on a shared machine hits both.
Seconds per iteration come from the run's own history (elapsed time between the first and the last
validation point, so process start-up, data loading and the final test evaluation are left out; the
validation time between those points is in). Prints one JSON document.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def recipe(path: Path, size: int, batch: int, threads: int) -> Path:
    d = yaml.safe_load((ROOT / "recipes" / "gmbinet_sd900.yaml").read_text())
    cpu = d["profiles"]["cpu"]
    cpu["preprocess"]["input_size"] = [size, size]
    cpu["train"].update(batch=batch, val_every=10, checkpoint_every=1000, val_batch=8, threads=threads)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="train.threads (split over the ranks)")
    args = ap.parse_args()
    counts = [int(n) for n in args.nproc.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="train_nproc."))
    rec = recipe(tmp / "r.yaml", args.size, args.batch, args.threads)
    per_it = {n: [] for n in counts}
    walls = {n: [] for n in counts}
    for rnd in range(args.rounds):
        for n in counts:
            out = tmp / f"r{rnd}_n{n}"
            cmd = [sys.executable, "-m", "edgekit.cli", "train", str(rec), "--profile", "cpu", "--data",
                   f"synthetic:{4 * args.batch}", "--iterations", str(args.iterations), "--limit-images",
                   str(3 * args.batch), "--out", str(out), "--nproc", str(n)]
            t0 = time.time()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "EDGEKIT_NO_PROGRESS": "1"})
            walls[n].append(time.time() - t0)
            h = json.loads((out / "report.json").read_text())["history"]
            per_it[n].append((h[-1]["elapsed_s"] - h[0]["elapsed_s"]) / (h[-1]["iteration"] - h[0]["iteration"]))
            print(f"round {rnd} nproc {n}: {per_it[n][-1]:.3f} s/iteration, {walls[n][-1]:.1f} s wall", file=sys.stderr)
    base = statistics.median(per_it[counts[0]])
    print(json.dumps({
        "settings": vars(args), "cpu_count": os.cpu_count(),
        "s_per_iteration": {n: {"median": statistics.median(v), "all": v} for n, v in per_it.items()},
        "images_per_s": {n: args.batch / statistics.median(v) for n, v in per_it.items()},
        "speedup_vs_first": {n: base / statistics.median(v) for n, v in per_it.items()},
        "wall_s": walls,
    }, indent=2))


if __name__ == "__main__":
    main()
