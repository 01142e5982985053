"""Cold start: what a station pays to load an artifact and run its first image, in a fresh process.

    python benchmarks/cold_start.py --artifact onnx=ART_ONNX --artifact openvino=ART_OV \\
        --artifact cpu-fused=ART_CF [--runs 5] [--threads 2] [--json OUT.json]

Each row is one process per run: ``python -c`` that imports numpy and edgekit, ``runtime.load(artifact)``, runs
one image of the artifact's input size (a seeded random N(0, 1) batch of 1, i.e. an already-preprocessed
512 x 512 image for the published model), closes the runner and exits.  ``wall`` is the whole process, interpreter
start to exit, timed by this script; ``peak RSS`` is the child's own ``resource.getrusage(RUSAGE_SELF).ru_maxrss``.
The rows run interleaved (round-robin), after one warm-up round that is not counted (file cache), and each row
reports the median of ``--runs`` runs.  A ``numpy alone`` row (import numpy, make the batch, exit) is the floor.

``LABEL=PATH@PYTHONPATH`` runs that row with another edgekit checkout first on ``PYTHONPATH`` (a before/after
comparison of the same kind of artifact; the artifact must be one that checkout loads).

The machine's load average is recorded before and after: on a shared machine the walls are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import numpy as np
folder, threads = sys.argv[1], int(sys.argv[2])
if folder == "-":  # the floor: numpy alone
    x = np.random.default_rng(0).standard_normal((1, 3, 512, 512), dtype=np.float32)
    y = x[:, :1]
else:
    from edgekit import runtime
    runner = runtime.load(folder, threads=threads)
    x = np.random.default_rng(0).standard_normal((1, *runner.input_shape), dtype=np.float32)
    y = runner.infer(x)
    if hasattr(runner, "close"):
        runner.close()
print(json.dumps({"inside_s": time.perf_counter() - t0, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "out_shape": list(y.shape), "torch": "torch" in sys.modules}))
"""


def run_once(folder: str, threads: int, pythonpath: Optional[str]) -> dict:
    env = {**os.environ, "EDGEKIT_NO_PROGRESS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath or str(ROOT), env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    # cwd: a folder holding no edgekit, so that PYTHONPATH decides which checkout is imported (-c puts cwd first)
    proc = subprocess.run([sys.executable, "-c", CHILD, folder, str(threads)], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: cold start of {folder} failed:\n{proc.stderr[-2000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, **res}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", action="append", default=[], metavar="LABEL=PATH[@PYTHONPATH]",
                    help="a row: its label and artifact folder (repeatable)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and every run here")
    args = ap.parse_args(argv)
    rows: Dict[str, tuple] = {"numpy alone": ("-", None)}
    for spec in args.artifact:
        label, _, rest = spec.partition("=")
        path, _, pypath = rest.partition("@")
        if not label or not Path(path).is_dir():
            raise SystemExit(f"error: --artifact {spec!r}: expected LABEL=ARTIFACT_FOLDER[@PYTHONPATH]")
        rows[label] = (path, pypath or None)
    load_before = os.getloadavg()
    runs: Dict[str, List[dict]] = {label: [] for label in rows}
    for rnd in range(args.runs + 1):  # round 0: warm-up, not counted
        for label, (path, pypath) in rows.items():
            r = run_once(path, args.threads, pypath)
            if rnd:
                runs[label].append(r)
            print(f"round {rnd} {label}: {r['wall_s']:.3f} s, {r['peak_rss_kib'] / 1024:.0f} MiB", file=sys.stderr)
    load_after = os.getloadavg()
    table = []
    for label, rs in runs.items():
        table.append({"row": label, "wall_median_s": statistics.median(r["wall_s"] for r in rs),
                      "wall_min_s": min(r["wall_s"] for r in rs),
                      "inside_median_s": statistics.median(r["inside_s"] for r in rs),
                      "peak_rss_median_mib": statistics.median(r["peak_rss_kib"] for r in rs) / 1024,
                      "imports_torch": any(r["torch"] for r in rs), "runs": len(rs)})
    meta = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "threads": args.threads, "load_average_before": load_before, "load_average_after": load_after,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    print(f"cold start: {args.runs} runs per row after a warm-up, interleaved; {args.threads} threads; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print("| row | wall (median) | wall (min) | peak RSS (median) | imports torch |")
    print("| --- | --- | --- | --- | --- |")
    for t in table:
        print(f"| {t['row']} | {t['wall_median_s']:.2f} s | {t['wall_min_s']:.2f} s | "
              f"{t['peak_rss_median_mib']:.0f} MiB | {'yes' if t['imports_torch'] else 'no'} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": table, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
