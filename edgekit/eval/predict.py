"""``edgekit predict``: binary masks and overlays a person can look at."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from edgekit.data.images import expand_image_paths, read_gray, write_png
from edgekit.eval.evaluate import note_stretching, predict_probs
from edgekit.progress import progress
from edgekit.backends.base import Runner


def overlay(gray: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Grey image with the defect tinted red and its outline drawn in yellow."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    red = np.array([255.0, 0.0, 0.0])
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * red
    m = mask
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    rgb[edge] = (255, 230, 0)
    return rgb.clip(0, 255).astype(np.uint8)


def output_names(image: Path, out_dir: Path) -> List[Path]:
    """The files ``predict`` writes for one input image."""
    return [out_dir / f"{Path(image).stem}_mask.png", out_dir / f"{Path(image).stem}_overlay.png"]


def predict(runner: Runner, inputs: Sequence[str], out_dir: Path, threshold: float = 0.5,
            batch_size: int = 4, show_progress: bool = True, note: Optional[Callable[[str], None]] = None) -> List[dict]:
    """``note``: told once when the images are stretched to another aspect ratio. The masks are at each
    image's own size (a letterboxed model's padding cut off before resizing back)."""
    paths = expand_image_paths(inputs, unique_stems=True)
    # Read everything first: an unreadable input fails before any output is written.
    images = [read_gray(p) for p in paths]
    if note is not None:
        note_stretching(note, [img.shape for img in images], runner)
    out_dir = Path(out_dir)
    # Every mask first, then the files: a model that outputs NaN on the 9th batch (refused by
    # predict_probs) leaves no outputs for the first eight behind.
    masks = []
    with progress(total=len(paths), desc="predict", enabled=show_progress) as bar:
        for i in range(0, len(paths), batch_size):
            group = images[i:i + batch_size]
            for prob in predict_probs(runner, group, [p.name for p in paths[i:i + batch_size]]):
                masks.append((prob >= threshold, float(prob.max())))
            bar.update(len(group))
    results = []
    for p, img, (mask, max_prob) in zip(paths, images, masks):
        mask_path, overlay_path = output_names(p, out_dir)
        write_png(mask_path, (mask * 255).astype(np.uint8))
        write_png(overlay_path, overlay(img, mask))
        results.append({"image": str(p), "mask": str(mask_path), "overlay": str(overlay_path),
                        "defect_fraction": float(mask.mean()), "max_prob": max_prob})
    return results
