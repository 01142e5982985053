"""Training throughput with 1 vs N processes at the same global batch (``edgekit train --nproc``).

    python benchmarks/train_nproc.py --runs 1:2,1:1,2:2 --rounds 1 --size 64 --batch 8 --iterations 6

``--runs`` lists NPROC:THREADS (train.threads, split over the ranks: 2:2 = two processes of one thread).
Runs the project's recipe (cpu profile, shrunk to --size/--batch, validation every third of the run) on
synthetic data, alternating the variants round by round so drift on a shared machine hits all of them.
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


def recipe(path: Path, size: int, batch: int, threads: int, val_every: int) -> Path:
    d = yaml.safe_load((ROOT / "recipes" / "gmbinet_sd900.yaml").read_text())
    cpu = d["profiles"]["cpu"]
    cpu["preprocess"]["input_size"] = [size, size]
    cpu["train"].update(batch=batch, val_every=val_every, checkpoint_every=1000, val_batch=8, threads=threads)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="1:2,1:1,2:2", help="NPROC:THREADS variants")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--images", type=int, default=8, help="train / val / test images (--limit-images)")
    args = ap.parse_args()
    counts = [v.strip() for v in args.runs.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="train_nproc."))
    val_every = max(1, args.iterations // 3)
    recipes = {v: recipe(tmp / f"r_{v.replace(':', '_')}.yaml", args.size, args.batch, int(v.split(":")[1]), val_every)
               for v in counts}
    per_it = {n: [] for n in counts}
    walls = {n: [] for n in counts}
    for rnd in range(args.rounds):
        for v in counts:
            n, rec = v.split(":")[0], recipes[v]
            out = tmp / f"r{rnd}_{v.replace(':', '_')}"
            cmd = [sys.executable, "-m", "edgekit.cli", "train", str(rec), "--profile", "cpu", "--data",
                   f"synthetic:{max(8, 2 * args.images)}", "--iterations", str(args.iterations), "--limit-images",
                   str(args.images), "--out", str(out), "--nproc", n]
            t0 = time.time()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "EDGEKIT_NO_PROGRESS": "1"})
            walls[v].append(time.time() - t0)
            h = json.loads((out / "report.json").read_text())["history"]
            per_it[v].append((h[-1]["elapsed_s"] - h[0]["elapsed_s"]) / (h[-1]["iteration"] - h[0]["iteration"]))
            print(f"round {rnd} nproc:threads {v}: {per_it[v][-1]:.3f} s/iteration, {walls[v][-1]:.1f} s wall, "
                  f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    base = statistics.median(per_it[counts[0]])
    print(json.dumps({
        "settings": {**vars(args), "val_every": val_every}, "cpu_count": os.cpu_count(),
        "s_per_iteration": {n: {"median": statistics.median(v), "all": v} for n, v in per_it.items()},
        "images_per_s": {n: args.batch / statistics.median(v) for n, v in per_it.items()},
        "speedup_vs_first": {n: base / statistics.median(v) for n, v in per_it.items()},
        "wall_s": walls,
    }, indent=2))


if __name__ == "__main__":
    main()
