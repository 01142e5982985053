"""Drift flag (issue 22): does the out-of-distribution score separate a product/defect the adapter never saw?

    python benchmarks/drift_auroc.py [--neu ../shared/datasets/neu-cls] [--work /tmp/edgekit-drift-bench]

NEU-CLS, one class left out at a time (6 folds): `add_task` (what `edgekit adapt` runs; EfficientNet-Lite0,
default recipe: 30 epochs, fc_dim 160, seed 0, the default 10 % drift hold-out) on the training part (the fixed
holdout_split 0.2, seed 0) of the other five classes; then, through the station's numpy path (the saved adapter
folder -> `DriftScorer.from_adapter`), score the held-out 20 % of those five (in-distribution, never trained on)
and all 300 images of the left-out class. Per fold and method: AUROC, the fraction of held-out in-distribution
images above the calibrated threshold (target: 1 - percentile) and of left-out images above it.

Methods: `mahalanobis-embedding` (the default: class means + shared covariance on the adapter's 160-d
embedding), `energy-logits` (-logsumexp of the logits), and for comparison only (not a saved method: its
projection alone is 1776 x k floats) `mahalanobis-raw-pca32`, the same score on a 32-d PCA of the raw pooled
backbone features of the fit images. Prints a markdown table; --json writes the numbers.
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
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgekit.data.datasets import ClassSample, holdout_split  # noqa: E402
from edgekit.mlff.adapter import load_adapter_arrays  # noqa: E402
from edgekit.mlff.drift import (ENERGY, MAHALANOBIS, DriftScorer, auroc, calibration_split)  # noqa: E402
from edgekit.mlff.heads import NumpyAdapter  # noqa: E402
from edgekit.models.backbones import load_backbone  # noqa: E402
from edgekit.train.continual import TaskData, add_task, extract_features, task_data_from_folder  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neu", default=str(ROOT.parent / "shared" / "datasets" / "neu-cls"))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "edgekit-drift-bench"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--json", default=None, help="write the numbers to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    full = task_data_from_folder(args.neu)
    bb = load_backbone("efficientnet-lite0")
    t0 = time.perf_counter()
    feats = extract_features(bb, full.paths, Path(args.work) / "cache").numpy()
    print(f"features: {feats.shape[0]} images in {time.perf_counter() - t0:.1f} s (cached under {args.work})",
          file=sys.stderr)
    labels = np.asarray(full.labels)
    pos = {p: i for i, p in enumerate(full.paths)}
    train, test = holdout_split([ClassSample(p, y) for p, y in zip(full.paths, full.labels)], 0.2, seed=0)
    rows = []
    for out, out_name in enumerate(full.classes):
        keep = [c for c in range(len(full.classes)) if c != out]
        tr = [s for s in train if s.label != out]
        te = np.array([pos[s.path] for s in test if s.label != out])
        ood = np.flatnonzero(labels == out)
        td = TaskData([s.path for s in tr], [keep.index(s.label) for s in tr], [full.classes[c] for c in keep])
        x = torch.from_numpy(feats[[pos[p] for p in td.paths]])
        for method in (MAHALANOBIS, ENERGY):
            reg = Path(args.work) / f"reg-{out_name}-{method}"
            if reg.exists():
                import shutil

                shutil.rmtree(reg)
            r = add_task(reg, bb, "neu5", td, epochs=args.epochs, feats=x, cache_dir=None, drift=method)
            arrays, meta = load_adapter_arrays(r["adapter_folder"])
            scorer = DriftScorer.from_adapter(arrays, {**meta, "folder": r["adapter_folder"]})
            ad = NumpyAdapter(arrays, meta["config"])

            def score(idx):
                f = feats[idx]
                return scorer.score(f, np.concatenate(ad.head_logits(f), axis=1))

            s_in, s_out = score(te), score(ood)
            rows.append({"left_out": out_name, "method": method, "auroc": auroc(s_in, s_out),
                         "flag_in": float(scorer.flagged(s_in).mean()), "flag_out": float(scorer.flagged(s_out).mean()),
                         "threshold": scorer.threshold, "bytes": r["drift"]["bytes"], "fit_s": r["drift"]["seconds"],
                         "train_s": r["train_seconds"], "calibrated_on": r["drift"]["calibrated_on"]})
        # comparison only: Mahalanobis on a 32-d PCA of the raw pooled features, same fit / calibration images
        fit_i, cal_i = calibration_split(td.labels, 0.1, 0)
        xf = feats[[pos[td.paths[i]] for i in fit_i]]
        mu = xf.mean(axis=0)
        proj = np.linalg.svd(xf - mu, full_matrices=False)[2][:32].T
        sc = DriftScorer.fit(MAHALANOBIS, (xf - mu) @ proj, np.asarray(td.labels)[fit_i])
        xc = feats[[pos[td.paths[i]] for i in cal_i]]
        sc.calibrate(sc.score(embedding=(xc - mu) @ proj))
        s_in, s_out = sc.score(embedding=(feats[te] - mu) @ proj), sc.score(embedding=(feats[ood] - mu) @ proj)
        rows.append({"left_out": out_name, "method": "mahalanobis-raw-pca32", "auroc": auroc(s_in, s_out),
                     "flag_in": float(sc.flagged(s_in).mean()), "flag_out": float(sc.flagged(s_out).mean()),
                     "threshold": sc.threshold, "bytes": (proj.size + mu.size) * 4 + len(sc.to_bytes())})
        print(f"{out_name}: " + ", ".join(f"{r['method']} {r['auroc']:.3f}" for r in rows if r["left_out"] == out_name),
              file=sys.stderr)

    methods = [MAHALANOBIS, ENERGY, "mahalanobis-raw-pca32"]
    print("| left-out class | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for out_name in full.classes:
        cells = []
        for m in methods:
            r = next(r for r in rows if r["left_out"] == out_name and r["method"] == m)
            cells.append(f"{r['auroc']:.3f} ({100 * r['flag_in']:.1f} % / {100 * r['flag_out']:.0f} %)")
        print(f"| {out_name} | " + " | ".join(cells) + " |")
    cells = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        cells.append(f"**{np.mean([r['auroc'] for r in rs]):.3f}** ({100 * np.mean([r['flag_in'] for r in rs]):.1f} % / "
                     f"{100 * np.mean([r['flag_out'] for r in rs]):.0f} %)")
    print("| mean | " + " | ".join(cells) + " |")
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        extra = (f", statistics fit {np.mean([r['fit_s'] for r in rs]):.3f} s, adapter training "
                 f"{np.mean([r['train_s'] for r in rs]):.1f} s" if "fit_s" in rs[0] else "")
        print(f"{m}: file {rs[0]['bytes'] / 1024:.1f} KiB{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
