"""Segmentation metrics for defect saliency maps, averaged per image.

* MAE - mean absolute error between the probability map and the binary mask;
* IoU - intersection over union of ``prob >= 0.5`` and the mask (1.0 when both are empty);
* max F-measure - F_beta with beta^2 = 0.3 at 256 thresholds; precision and recall are averaged
  over images at each threshold, and the best threshold's F is reported (the usual saliency maxF).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

BETA2 = 0.3
N_THRESH = 256


def image_scores(prob: np.ndarray, mask: np.ndarray):
    """Per-image (MAE, IoU@0.5, precision[256], recall[256])."""
    prob = np.asarray(prob, dtype=np.float32)
    gt = np.asarray(mask, dtype=bool)
    mae = float(np.abs(prob - gt).mean())
    pred = prob >= 0.5
    union = np.logical_or(pred, gt).sum()
    iou = float(np.logical_and(pred, gt).sum() / union) if union else 1.0
    # Histogram the probabilities of foreground and background pixels once, then sweep thresholds.
    bins = np.clip((prob * (N_THRESH - 1)).round().astype(np.int64), 0, N_THRESH - 1)
    fg = np.bincount(bins[gt], minlength=N_THRESH)[::-1].cumsum()[::-1]  # pixels >= t that are fg
    bg = np.bincount(bins[~gt], minlength=N_THRESH)[::-1].cumsum()[::-1]
    tp, fp = fg.astype(np.float64), bg.astype(np.float64)
    n_gt = float(gt.sum())
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    recall = tp / n_gt if n_gt else np.zeros(N_THRESH)
    return mae, iou, precision, recall


@dataclass
class _Acc:
    mae: List[float] = field(default_factory=list)
    iou: List[float] = field(default_factory=list)
    prec: List[np.ndarray] = field(default_factory=list)
    rec: List[np.ndarray] = field(default_factory=list)

    def summary(self) -> Dict[str, float]:
        p, r = np.mean(self.prec, axis=0), np.mean(self.rec, axis=0)
        f = (1 + BETA2) * p * r / np.maximum(BETA2 * p + r, 1e-12)
        return {"images": len(self.mae), "mae": float(np.mean(self.mae)), "iou": float(np.mean(self.iou)),
                "max_f": float(f.max())}


class SegMetrics:
    """Accumulates per-image scores; ``summary()`` gives overall and per-class figures."""

    def __init__(self):
        self._all = _Acc()
        self._by_class: Dict[str, _Acc] = {}

    def add(self, prob: np.ndarray, mask: np.ndarray, cls: str = "all") -> None:
        mae, iou, p, r = image_scores(prob, mask)
        for acc in (self._all, self._by_class.setdefault(cls, _Acc())):
            acc.mae.append(mae)
            acc.iou.append(iou)
            acc.prec.append(p)
            acc.rec.append(r)

    def __len__(self):
        return len(self._all.mae)

    def summary(self) -> dict:
        return {"overall": self._all.summary(),
                "per_class": {c: a.summary() for c, a in sorted(self._by_class.items())}}
