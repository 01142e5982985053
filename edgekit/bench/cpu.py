"""``edgekit bench --device cpu``: one table, one row per backend x precision, measured in one run.

Timing: every row is warmed up, then measured in interleaved rounds (row A, row B, ... , row A, ...)
so drift on a noisy machine hits all rows alike. The headline FPS is what an application sees:
one synchronous request, one image at a time (1 / median latency at batch 1). Throughput with
several requests in flight is a separate column, for backends that offer async queues.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from edgekit.data.datasets import open_segmentation
from edgekit.eval.evaluate import evaluate
from edgekit.artifact import is_artifact, now_utc, read_manifest
from edgekit.progress import progress
from edgekit.backends.base import Runner

PAPER_ROW = {"name": "paper (arXiv 2508.16397, their CPU)", "fps_b1": 16.53, "iou": 0.8728, "mae": 0.0126,
             "note": "reported on the authors' split and hardware; batch size not stated"}
SCHEMA = "edgekit-bench/1"


def machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "isa": isa, "os": platform.platform(),
            "python": platform.python_version()}


@dataclass
class Row:
    name: str
    runner: Runner
    size_bytes: int
    lat: Dict[int, List[float]] = field(default_factory=dict)  # batch -> per-call seconds
    result: dict = field(default_factory=dict)


def model_size(path: Path) -> int:
    if is_artifact(path):
        return int(read_manifest(path, verify=False).get("size_bytes", 0))
    return path.stat().st_size if path.is_file() else 0


def time_rows(rows: List[Row], batches: List[int], rounds: int, iters: int, warmup: int, show_progress: bool):
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, *rows[0].runner.input_shape)).astype(np.float32) for b in batches}
    for r in rows:
        for b in batches:
            for _ in range(warmup):
                r.runner.infer(inputs[b])
            r.lat[b] = []
    with progress(total=rounds * len(rows) * len(batches), desc="timing", enabled=show_progress, unit="run") as bar:
        for _ in range(rounds):
            for b in batches:
                for r in rows:  # interleaved: each round visits every row
                    n = max(1, iters // b)
                    for _ in range(n):
                        t0 = time.perf_counter()
                        r.runner.infer(inputs[b])
                        r.lat[b].append(time.perf_counter() - t0)
                    bar.update(1)


def throughput(runner: Runner, batch: int, jobs: int, seconds: float) -> Optional[float]:
    """Images/s with ``jobs`` requests in flight, for runners that offer an async queue."""
    make = getattr(runner, "throughput_queue", None)
    if make is None:
        return None
    queue = make(batch, jobs)
    x = np.random.default_rng(1).standard_normal((batch, *runner.input_shape)).astype(np.float32)
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(jobs):
            queue.start_async({0: x})
        queue.wait_all()
        done += jobs * batch
    return done / (time.perf_counter() - t0)


def row_summary(r: Row, batches, async_jobs: int) -> dict:
    """One JSON row: identity, size, ``r.result`` (accuracy), latency percentiles at batch 1, FPS per batch."""
    l1 = np.array(r.lat[1]) * 1e3
    fps_by_batch = {b: b / float(np.median(r.lat[b])) for b in batches}
    best = max(fps_by_batch, key=fps_by_batch.get)
    tp = throughput(r.runner, 1, async_jobs, 2.0)
    return {
        "name": r.name, "backend": r.runner.name, "precision": r.runner.precision,
        "source": str(r.runner.source), "size_bytes": r.size_bytes, **r.result,
        "latency_ms": {"p50": float(np.percentile(l1, 50)), "p90": float(np.percentile(l1, 90)),
                       "p99": float(np.percentile(l1, 99)), "samples": int(len(l1))},
        "fps_b1": fps_by_batch[1], "fps_by_batch": {str(b): v for b, v in fps_by_batch.items()},
        "best_batch": best, "fps_best": fps_by_batch[best],
        "throughput_fps": tp, "throughput_jobs": async_jobs if tp else None,
    }


def run_bench(rows: List[Row], data: str = "synthetic", batches=(1, 8), rounds: int = 5, iters: int = 20,
              warmup: int = 5, eval_limit: Optional[int] = None, async_jobs: int = 2,
              show_progress: bool = True, baseline: Optional[str] = None) -> dict:
    batches = sorted(set(batches) | {1})
    dataset = open_segmentation(data, "test")
    for r in rows:
        acc = evaluate(r.runner, dataset, batch_size=1, show_progress=show_progress, limit=eval_limit)
        r.result.update(iou=acc["overall"]["iou"], mae=acc["overall"]["mae"], max_f=acc["overall"]["max_f"])
    time_rows(rows, batches, rounds, iters, warmup, show_progress)
    out_rows = [row_summary(r, batches, async_jobs) for r in rows]
    base = next((r for r in out_rows if r["name"] == baseline), None) if baseline else None
    for r in out_rows:
        r["speedup_vs_baseline"] = r["fps_b1"] / base["fps_b1"] if base else None
        r["iou_delta_vs_torch"] = None
    torch_row = next((r for r in out_rows if r["backend"] == "torch"), None)
    if torch_row:
        for r in out_rows:
            r["iou_delta_vs_torch"] = r["iou"] - torch_row["iou"]
    return {
        "schema": SCHEMA, "device": "cpu", "date": now_utc(), "machine": machine_description(),
        "data": dataset.description, "synthetic": dataset.synthetic, "eval_images": eval_limit or len(dataset),
        "settings": {"batches": batches, "rounds": rounds, "iters_per_round": iters, "warmup": warmup,
                     "threads": rows[0].runner.meta.get("threads") if rows else None,
                     "timing": "interleaved rounds, synchronous single request; FPS = batch / median latency"},
        "baseline": baseline, "rows": out_rows, "reference": PAPER_ROW,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8))
    markers = "osD^v<>ph*"
    metric = "accuracy" if result.get("kind") == "mlff" else "iou"  # MLFF rows: top-1 classification accuracy
    for i, r in enumerate(result["rows"]):  # a legend, not labels: close rows would overlap
        ax.scatter(r["fps_b1"], r[metric], s=45, marker=markers[i % len(markers)], color=plt.cm.tab20(i % 20),
                   label=r["name"])
    p = result["reference"]
    if p:
        ax.scatter(p["fps_b1"], p["iou"], marker="x", color="k", s=50, label=p.get("plot_label", "paper (their CPU, their split)"))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xscale("log")
    ax.set_xlabel("FPS, batch 1, synchronous (log scale)")
    ax.set_ylabel(("top-1 accuracy" if metric == "accuracy" else "IoU@0.5") + (" (synthetic data)" if result["synthetic"] else ""))
    ax.set_title(f"edgekit bench, {(result['machine'].get('gpu') or result['machine']['cpu'])[:40]}", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
