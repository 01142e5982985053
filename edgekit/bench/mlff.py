"""``edgekit bench REGISTRY --data DIR``: an MLFF model (frozen backbone + the registry's adapter heads).

Rows: the backbone in PyTorch and compiled for each backend (ONNX Runtime, OpenVINO fp32 / INT8, ...),
each followed by the same PyTorch adapter. A row's latency is the whole per-image path after
preprocessing: backbone features, adapter trunk and all N heads. Timing is the machinery of
``edgekit.bench.cpu`` (warm-up, interleaved rounds, batch 1 headline, same JSON row fields).

Accuracy: top-1 classification accuracy on the fixed held-out part of ``--data`` (class folders,
``holdout_split(0.2, seed 0)``: the test part of ``benchmarks/mlff_neu.py``; train the registry with
``edgekit adapt --holdout 0.2`` so those images are unseen), on the images of classes the registry
knows, plus top-1 agreement with the PyTorch row. Sizes: backbone (artifact files or weights file),
adapter (its registry folder), and their sum.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from edgekit.bench.cpu import Row, add_baseline_ratios, machine_description, row_summary, time_rows
from edgekit.bench.plan import cache_root, parse_backend
from edgekit.errors import EdgekitError
from edgekit.artifact import is_artifact, now_utc, read_manifest
from edgekit.progress import progress

MLFF_BASELINE = "torch"


def default_mlff_backends() -> List[str]:
    """The rows of ``edgekit bench REGISTRY``: torch, then every CPU backend that compiles MLFF backbones at
    its default bench precisions (the plugin-default precision is a GMBINet baseline, not an MLFF row)."""
    from edgekit.backends.registry import backends

    rows = [MLFF_BASELINE]
    for b in backends():
        if b.device == "cpu" and b.build is not None and "mlff-backbone" in b.kinds:
            rows += [f"{b.name}:{p}" for p in b.bench_default if p != "default"]
    return rows
SCHEMA = "edgekit-bench/1"


def backbone_artifact_for(registry: str, spec: str, data: Optional[str], calib: Optional[str], threads, log) -> Path:
    """Compile (or reuse) the registry's backbone for ``spec`` = target[:precision], cached by backbone sha256."""
    from edgekit.pipeline.compile import compile_model
    from edgekit.mlff.registry import Registry

    reg = Registry.open(registry)
    target, precision = parse_backend(spec)
    folder = cache_root() / "bench" / f"mlff-{reg.meta['backbone_sha256'][:16]}" / f"{target}_{precision}"
    if is_artifact(folder):
        try:
            if read_manifest(folder)["model"].get("backbone_sha256") == reg.meta["backbone_sha256"]:
                return folder
        except (EdgekitError, KeyError):
            pass  # stale or corrupt cache entry: rebuild it
    compile_model(str(registry), target, precision, str(folder), calib=calib, parity_data=data or "synthetic:12",
                  force=True, threads=threads, log=log)
    return folder


def plan_mlff_rows(registry: str, backends: List[str], data: Optional[str], calib: Optional[str], threads,
                   log) -> List[Row]:
    """One Row per backend: MLFFRunner(backbone runner, adapter); sizes backbone + adapter."""
    from edgekit import runtime
    from edgekit.mlff.runner import MLFFRunner, check_backbone_match, load_mlff_runner
    from edgekit.mlff.registry import Registry

    reg = Registry.open(registry)
    folder = reg.adapter_folder()
    adapter_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    torch_runner = load_mlff_runner(registry, threads=threads)  # checks the weights against the registry
    rows = []
    for spec in backends:
        if spec == "torch":
            r = torch_runner
            size = torch_runner.features.backbone.weights_path.stat().st_size
        else:
            art = backbone_artifact_for(registry, spec, data, calib, threads, log)
            man = read_manifest(art)
            check_backbone_match(man, torch_runner.meta, f"registry {registry}", art)
            r = MLFFRunner(runtime.load(art, threads=threads), torch_runner.adapter, torch_runner.meta, art)
            size = int(man["size_bytes"])
        row = Row(spec, r, size + adapter_bytes)
        row.result.update(backbone_bytes=size, adapter_bytes=adapter_bytes, heads=r.heads)
        rows.append(row)
    return rows


def _accuracy(runner, arrays: List[np.ndarray], show_progress: bool) -> List[dict]:
    from edgekit.mlff.classifier import MLFFClassifier

    clf = MLFFClassifier(None, runner.adapter, runner.meta)
    preds = []
    with progress(total=len(arrays), desc=f"accuracy {runner.describe()[:40]}", enabled=show_progress, unit="img") as bar:
        for x in arrays:
            preds += clf.predict_features(torch.from_numpy(np.ascontiguousarray(runner.features.infer(x))))
            bar.update(1)
    return preds


def run_mlff_bench(rows: List[Row], data: str, batches=(1, 8), rounds: int = 5, iters: int = 20, warmup: int = 5,
                   eval_limit: Optional[int] = None, async_jobs: int = 2, show_progress: bool = True,
                   baseline: Optional[str] = MLFF_BASELINE, registry: Optional[str] = None) -> dict:
    from edgekit.pipeline.mlff_source import open_images

    if not rows:
        raise EdgekitError("no rows to benchmark")
    batches = sorted(set(batches) | {1})
    classes = rows[0].runner.meta["classes"] if rows[0].runner.meta["config"]["setting"] == "class-incremental" else \
        [c for t in rows[0].runner.meta["config"]["tasks"] for c in t["classes"]]
    images = open_images(data, "test")
    idx = [i for i, lab in enumerate(images.labels) if lab is not None and lab in classes]
    if not idx:
        raise EdgekitError(f"{images.description}: no labelled images of the registry's classes ({', '.join(classes)}); "
                           "give class folders (DIR/<class>/*) with those names")
    if eval_limit and eval_limit < len(idx):  # spread over the classes (the held-out part is sorted by class)
        idx = [idx[int(i)] for i in sorted(set(np.linspace(0, len(idx) - 1, eval_limit).astype(int).tolist()))]
    labels = [images.labels[i] for i in idx]
    arrays = [rows[0].runner.preprocess(images.arrays([i])) for i in idx]
    preds = {}
    for r in rows:
        p = _accuracy(r.runner, arrays, show_progress)
        preds[r.name] = p
        r.result["accuracy"] = float(np.mean([q["class"] == y for q, y in zip(p, labels)]))
    del arrays
    time_rows(rows, batches, rounds, iters, warmup, show_progress)
    out_rows = [row_summary(r, batches, async_jobs) for r in rows]
    base = add_baseline_ratios(out_rows, rows, baseline)
    ref = next((r for r in out_rows if r["backend"].startswith("torch")), None)
    key = (lambda q: (q.get("task"), q["class"]))
    for r in out_rows:
        r["accuracy_delta_vs_torch"] = r["accuracy"] - ref["accuracy"] if ref else None
        r["top1_agreement_vs_torch"] = float(np.mean([key(a) == key(b) for a, b in zip(preds[r["name"]], preds[ref["name"]])])) \
            if ref else None
    m0 = rows[0].runner.meta
    return {
        "schema": SCHEMA, "kind": "mlff", "device": "cpu", "date": now_utc(), "machine": machine_description(),
        "data": images.description, "synthetic": images.synthetic, "eval_images": len(idx),
        "model": {"registry": str(registry) if registry else None,
                  "backbone": m0["backbone"], "backbone_sha256": m0["backbone_sha256"],
                  "setting": m0["config"]["setting"], "tasks": [t["task"] for t in m0["config"]["tasks"]],
                  "classes": classes, "heads": rows[0].runner.heads},
        "settings": {"batches": batches, "rounds": rounds, "iters_per_round": iters, "warmup": warmup,
                     "timing": "interleaved rounds, synchronous single request, preprocessed input -> backbone "
                               "features -> adapter trunk + all heads; FPS = batch / median latency"},
        "baseline": baseline if base else None, "rows": out_rows, "reference": None,
    }
