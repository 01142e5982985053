"""Comparing a transformed model with its source on real images (kept apart from loaders/runners)."""
from __future__ import annotations


import numpy as np

from edgekit.data.datasets import SegDataset, limit_samples
from edgekit.data.preprocess import preprocess
from edgekit.backends.base import Runner


def parity(reference: Runner, candidate: Runner, dataset: SegDataset, limit: int = 16, threshold: float = 0.5) -> dict:
    """Max/mean absolute difference of probabilities and mean IoU of the two thresholded masks,
    at the network's output resolution, image by image."""
    max_abs, mean_abs, agree = 0.0, [], []
    samples = limit_samples(dataset.samples, limit)  # every class, not the first class only
    for s in samples:
        x = preprocess([s.image()], reference.spec)
        a, b = reference.infer(x)[0, 0], candidate.infer(x)[0, 0]
        d = np.abs(a.astype(np.float64) - b)
        max_abs = max(max_abs, float(d.max()))
        mean_abs.append(float(d.mean()))
        ma, mb = a >= threshold, b >= threshold
        union = np.logical_or(ma, mb).sum()
        agree.append(float(np.logical_and(ma, mb).sum() / union) if union else 1.0)
    return {"images": len(samples), "data": dataset.description, "reference": reference.describe(),
            "max_abs_diff": max_abs, "mean_abs_diff": float(np.mean(mean_abs)),
            "mask_iou_agreement": float(np.mean(agree)), "min_mask_iou_agreement": float(np.min(agree))}
