"""Measure compile-time parity (max |diff|, mask IoU agreement) per target and precision on real
SD-900 images, to choose the fail-closed budgets in edgekit/pipeline/parity.py.

fp16/bf16 on a CPU without native support run in f32 inside OpenVINO, so the reduced-precision rows
also run the PyTorch model itself in bfloat16 / float16 (weights and activations), which is what a
device with native support computes (up to its accumulation order).

    python benchmarks/parity_budget.py [--images 64] [--out benchmarks/out/parity_budget.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def stats(ref, cand, images, threshold=0.5, margin=0.0):
    diffs, means, ious, decisive = [], [], [], []
    for x in images:
        a, b = ref(x)[0, 0].astype(np.float64), cand(x)[0, 0].astype(np.float64)
        diffs.append(float(np.abs(a - b).max()))
        means.append(float(np.abs(a - b).mean()))
        ma, mb = a >= threshold, b >= threshold
        u = np.logical_or(ma, mb).sum()
        ious.append(float(np.logical_and(ma, mb).sum() / u) if u else 1.0)
        sure = np.abs(a - threshold) >= margin  # edgekit.pipeline.parity: decisive pixels only
        da, db = ma & sure, mb & sure
        u = np.logical_or(da, db).sum()
        decisive.append(float(np.logical_and(da, db).sum() / u) if u else 1.0)
    return {"max_abs_diff": max(diffs), "median_max_abs_diff": float(np.median(diffs)),
            "mean_abs_diff": float(np.mean(means)), "worst_image_mean_abs_diff": max(means),
            "mask_iou_agreement": float(np.mean(ious)), "min_mask_iou_agreement": min(ious),
            "decision_margin": margin, "decisive_mask_agreement": float(np.mean(decisive)),
            "min_decisive_mask_agreement": min(decisive)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--checkpoint", default=str(SHARED / "checkpoints/gmbinet_sd900_official.pt"))
    ap.add_argument("--data", default=str(SHARED / "datasets/sd-saliency-900"))
    ap.add_argument("--targets", default="onnx:fp32,ort:fp32,openvino:fp32,openvino:fp16,openvino:bf16,"
                                         "executorch:fp32,cpu-fused:fp32")
    ap.add_argument("--out", default="benchmarks/out/parity_budget.json")
    a = ap.parse_args(argv)
    import torch
    from edgekit import runtime
    from edgekit.data.datasets import limit_samples, open_segmentation
    from edgekit.data.preprocess import preprocess
    from edgekit.models.checkpoint import load_checkpoint
    from edgekit.pipeline.compile import compile_model

    ck = load_checkpoint(a.checkpoint)
    ds = open_segmentation(a.data, "test")
    xs = [preprocess([s.image()], ck.preprocess) for s in limit_samples(ds.samples, a.images)]
    model = ck.build()

    def torch_run(dtype):
        m = ck.build().to(dtype)

        def run(x):
            with torch.inference_mode():
                return m(torch.from_numpy(x).to(dtype)).float().numpy()
        return run

    ref = torch_run(torch.float32)
    from edgekit.pipeline.parity import PARITY_BUDGETS
    import edgekit.pipeline.sources as sources

    def margin(row):
        return PARITY_BUDGETS[row.split(":")[1]]["decision_margin"]
    sources.PARITY_BUDGETS = {}  # measure what the targets give, not what the gate lets through
    rows = {}
    for dtype, name in ((torch.bfloat16, "torch:bf16"), (torch.float16, "torch:fp16")):
        try:
            rows[name] = stats(ref, torch_run(dtype), xs, margin=margin(name))
        except Exception as e:  # fp16 convolution may be missing on this CPU build
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
        print(name, rows[name], file=sys.stderr)
    tmp = Path(tempfile.mkdtemp())
    try:
        for tp in a.targets.split(","):
            target, precision = tp.split(":")
            out = tmp / tp.replace(":", "_")
            try:
                compile_model(a.checkpoint, target, precision, str(out), parity_data=a.data, log=lambda *_: None)
                r = runtime.load(out)
                rows[tp] = stats(ref, r.infer, xs, margin=margin(tp))
                rows[tp]["ran"] = r.describe()
            except Exception as e:
                rows[tp] = {"error": f"{type(e).__name__}: {e}"}
            print(tp, rows[tp], file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    doc = {"checkpoint": a.checkpoint, "data": ds.description, "images": len(xs), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
