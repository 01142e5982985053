"""Defect regions of a segmentation mask: 8-connected components in numpy alone (the station runs without
scipy: the runtime install carries numpy only).

The labelling works on runs, not pixels: each row's foreground is run-length encoded, runs on neighbouring
rows that touch (8-connectivity: their column spans overlap with one pixel of slack) are joined by a
vectorised union-find, and every per-region number is a reduction over the runs (or, for the peak, over
the pixels of the runs). Cost grows with the number of runs, which for a defect mask is far below the
number of pixels.
"""
from __future__ import annotations

import numpy as np

from edgekit.errors import EdgekitError


def _as_2d(prob_mask) -> np.ndarray:
    a = np.asarray(prob_mask)
    while a.ndim > 2 and a.shape[0] == 1:  # (1, H, W) or (1, 1, H, W): a batch of one
        a = a[0]
    if a.ndim != 2:
        raise EdgekitError(f"a segmentation mask must be H x W (or 1 x H x W), got shape {tuple(np.shape(prob_mask))}")
    return a


def _runs(fg: np.ndarray):
    """Row-major runs of True: (row, start, end) with ``end`` exclusive."""
    h, w = fg.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = fg
    d = np.diff(padded, axis=1)  # +1 where a run starts, -1 one past where it ends (columns shifted by the pad)
    rows_s, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # same row-major order: the i-th end closes the i-th start
    return rows_s, starts, ends


def _touching_pairs(rows, starts, ends, width):
    """Index pairs (a, b) of runs on rows r and r + 1 that are 8-connected: b.start <= a.end and
    b.end >= a.start (ends exclusive, so this is overlap with one pixel of slack on each side)."""
    k = width + 2  # a row stride larger than any column: keys sort row-major and never cross a row
    start_keys = rows * k + starts
    end_keys = rows * k + ends
    nxt = (rows + 1) * k
    lo = np.searchsorted(end_keys, nxt + starts, side="left")   # first run with key end >= next row's a.start
    hi = np.searchsorted(start_keys, nxt + ends, side="right")  # first run past next row's a.end
    count = np.maximum(hi - lo, 0)
    total = int(count.sum())
    if total == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    a = np.repeat(np.arange(len(rows)), count)
    offsets = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
    b = np.repeat(lo, count) + offsets
    return a, b


def _union_find(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root (smallest member index) of every node, vectorised: hook each root under the smallest root it
    touches, then compress paths fully; every tree with an edge merges each round, so the rounds are
    logarithmic in the number of runs."""
    parent = np.arange(n)
    if len(a) == 0:
        return parent
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return parent
        ra, rb = ra[differ], rb[differ]
        low, high = np.minimum(ra, rb), np.maximum(ra, rb)
        np.minimum.at(parent, high, low)  # high is a root: it hooks under a smaller root (no cycles)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def mask_regions(prob_mask, threshold: float = 0.5, min_px: int = 1) -> list[dict]:
    """The 8-connected regions of ``prob_mask >= threshold`` with at least ``min_px`` pixels, largest first.

    Each region: ``{"area_px": int, "area_frac": float (of the whole mask), "bbox": [x0, y0, x1, y1],
    "peak": float}``. The bbox is inclusive-exclusive like a Python slice: the region lies in columns
    ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1`` (``mask[y0:y1, x0:x1]`` crops it). ``peak`` is the highest
    mask value inside the region. Ties in area keep top-to-bottom, left-to-right order.
    """
    prob = _as_2d(prob_mask)
    h, w = prob.shape
    fg = prob >= threshold
    rows, starts, ends = _runs(fg)
    n = len(rows)
    if n == 0:
        return []
    a, b = _touching_pairs(rows, starts, ends, w)
    root = _union_find(n, a, b)
    # roots are the smallest run index of their region: row-major first run, so labels follow scan order
    roots, label = np.unique(root, return_inverse=True)
    m = len(roots)
    lengths = ends - starts
    area = np.bincount(label, weights=lengths, minlength=m).astype(np.int64)
    x0 = np.full(m, w, np.int64)
    np.minimum.at(x0, label, starts)
    x1 = np.zeros(m, np.int64)
    np.maximum.at(x1, label, ends)
    y0 = rows[roots]  # the root run is the region's first row
    y1 = np.zeros(m, np.int64)
    np.maximum.at(y1, label, rows + 1)
    # the peak over each region's pixels: expand the runs to flat pixel indices (only foreground pixels)
    total = int(lengths.sum())
    run_of_px = np.repeat(np.arange(n), lengths)
    px = (rows * w + starts)[run_of_px] + (np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths))
    values = prob.reshape(-1)[px].astype(np.float64)
    peak = np.full(m, -np.inf)
    np.maximum.at(peak, label[run_of_px], values)
    keep = np.nonzero(area >= max(int(min_px), 1))[0]
    order = keep[np.argsort(-area[keep], kind="stable")]
    size = float(h * w)
    return [{"area_px": int(area[i]), "area_frac": float(area[i]) / size,
             "bbox": [int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i])], "peak": float(peak[i])}
            for i in order]


def segment_summary(prob_mask, threshold: float = 0.5, min_px: int = 1) -> dict:
    """``{"regions": mask_regions(...), "defect_frac": float}``: the part of a Result's ``segment`` that
    the mask gives (the caller adds ``artifact``). ``defect_frac`` is the fraction of ALL pixels at or above
    ``threshold``, small specks included (the regions list leaves out those under ``min_px``)."""
    prob = _as_2d(prob_mask)
    frac = float(np.count_nonzero(prob >= threshold)) / float(prob.size) if prob.size else 0.0
    return {"regions": mask_regions(prob, threshold, min_px), "defect_frac": frac}
