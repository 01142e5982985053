"""Procedural steel-strip images with inclusion, patch and scratch defects, and their masks.

Used for demos, smoke tests and as calibration data when a user has none. Deterministic per seed.
The texture imitates cold-rolled strip: a grey base with rolling streaks along one axis, slow
illumination gradients and sensor noise. Defects are drawn into the texture and into the mask:

* inclusion - small dark elongated specks, aligned with the rolling direction, a few per image;
* patches   - one or two large irregular darker (or brighter) regions with soft edges;
* scratches - thin long bright or dark lines, slightly curved, at any angle.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np


CLASSES = ("inclusion", "patches", "scratches")


def _smooth_noise(rng, h, w, scale):
    """Bilinearly upsampled coarse noise: low-frequency structure at roughly ``scale`` pixels."""
    gh, gw = max(2, h // scale + 2), max(2, w // scale + 2)
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    ys = np.linspace(0, gh - 1.001, h)
    xs = np.linspace(0, gw - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = g[y0][:, x0]
    b = g[y0][:, x0 + 1]
    c = g[y0 + 1][:, x0]
    d = g[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _steel_background(rng, h, w):
    base = rng.uniform(90, 150)
    streaks = rng.standard_normal(w).astype(np.float32)
    streaks = np.convolve(streaks, np.ones(5) / 5, mode="same")[None, :] * rng.uniform(3, 8)
    img = base + streaks + _smooth_noise(rng, h, w, 50) * rng.uniform(4, 10)
    img += _smooth_noise(rng, h, w, 8) * 3 + rng.standard_normal((h, w)) * rng.uniform(2, 5)
    if rng.random() < 0.5:  # rolling direction: vertical streaks or horizontal
        img = img.T if h == w else img
    return img


def _ellipse(h, w, cy, cx, ry, rx, angle):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ca, sa = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * ca + (yy - cy) * sa) / rx
    v = (-(xx - cx) * sa + (yy - cy) * ca) / ry
    return u * u + v * v


def _inclusion(rng, img, mask):
    h, w = img.shape
    for _ in range(rng.integers(1, 5)):
        cy, cx = rng.uniform(10, h - 10), rng.uniform(10, w - 10)
        r = _ellipse(h, w, cy, cx, rng.uniform(1.5, 4), rng.uniform(5, 20), rng.normal(np.pi / 2, 0.2))
        blob = r < 1 + 0.3 * _smooth_noise(rng, h, w, 4)
        img[blob] -= rng.uniform(35, 70)
        mask |= blob


def _patches(rng, img, mask):
    h, w = img.shape
    for _ in range(rng.integers(1, 3)):
        cy, cx = rng.uniform(0.2 * h, 0.8 * h), rng.uniform(0.2 * w, 0.8 * w)
        r = _ellipse(h, w, cy, cx, rng.uniform(15, 45), rng.uniform(15, 45), rng.uniform(0, np.pi))
        field = r + 0.6 * _smooth_noise(rng, h, w, 12)
        blob = field < 1
        soft = np.clip(1.3 - field, 0, 1)
        img -= soft * rng.uniform(40, 75) * (1 if rng.random() < 0.85 else -0.8)
        mask |= blob


def _scratches(rng, img, mask):
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(rng.integers(1, 3)):
        ang = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(0.3 * h, 0.7 * h), rng.uniform(0.3 * w, 0.7 * w)
        length, width = rng.uniform(0.4, 0.9) * max(h, w), rng.uniform(1.0, 2.5)
        ca, sa = np.cos(ang), np.sin(ang)
        along = (xx - cx) * ca + (yy - cy) * sa
        across = -(xx - cx) * sa + (yy - cy) * ca - rng.uniform(-1, 1) * 1e-3 * along ** 2  # slight bend
        line = (np.abs(across) < width) & (np.abs(along) < length / 2)
        img[line] += rng.uniform(40, 80) * (1 if rng.random() < 0.5 else -1)
        mask |= line


_DRAW = {"inclusion": _inclusion, "patches": _patches, "scratches": _scratches}


def generate(index: int, size: Tuple[int, int] = (200, 200), seed: int = 0) -> Tuple[np.ndarray, np.ndarray, str]:
    """Image ``index`` of the synthetic set: (uint8 image, bool mask, class name)."""
    rng = np.random.default_rng([seed, index])
    cls = CLASSES[index % len(CLASSES)]
    h, w = size
    img = _steel_background(rng, h, w)
    mask = np.zeros((h, w), dtype=bool)
    _DRAW[cls](rng, img, mask)
    return np.clip(img, 0, 255).astype(np.uint8), mask, cls
