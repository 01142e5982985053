"""Time of ``edgekit.station.regions.mask_regions`` (numpy 8-connected regions) per SD-Saliency-900 ground-truth
mask, as stored (200 x 200) and upscaled to 512 x 512 (bilinear), median of 3 passes over all 900 masks.

    python benchmarks/regions_bench.py
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgekit.data.images import read_gray  # noqa: E402
from edgekit.station.regions import mask_regions  # noqa: E402

GT = ROOT.parent / "shared" / "datasets" / "sd-saliency-900" / "Ground truth"


def main():
    from PIL import Image

    files = sorted(GT.glob("*.png"))
    if not files:
        raise SystemExit(f"no masks in {GT} (../shared)")
    masks = [read_gray(f).astype(np.float32) / 255 for f in files]
    big = [np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize((512, 512), Image.BILINEAR),
                      np.float32) / 255 for m in masks]
    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}, "
          f"{os.cpu_count()} CPUs")
    for name, ms in (("200x200 (as stored)", masks), ("512x512 (bilinear upscale)", big)):
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            for m in ms:
                mask_regions(m, 0.5, 1)
            runs.append((time.perf_counter() - t) / len(ms) * 1e3)
        px = np.mean([(m >= 0.5).sum() for m in ms])
        print(f"{name}: {len(ms)} masks, mean {px:.0f} defect px, ms per mask: median {np.median(runs):.2f} "
              f"(passes {', '.join(f'{x:.2f}' for x in runs)})")


if __name__ == "__main__":
    main()
