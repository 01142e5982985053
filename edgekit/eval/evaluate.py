"""Evaluate any runner on a segmentation dataset: per-class MAE, IoU@0.5 and max F-measure."""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional

import numpy as np

from edgekit.data.datasets import SegDataset, SegSample, limit_samples
from edgekit.data.preprocess import aspect_note, preprocess, resize_probs
from edgekit.errors import EdgekitError
from edgekit.eval.metrics import SegMetrics
from edgekit.progress import progress
from edgekit.backends.base import Runner


def batches(samples: List[SegSample], size: int) -> Iterator[List[SegSample]]:
    for i in range(0, len(samples), size):
        yield samples[i:i + size]


def predict_probs(runner: Runner, images: List[np.ndarray], names: Optional[List[str]] = None) -> List[np.ndarray]:
    """Probability maps at each image's own size. A NaN or Inf output is refused, not scored: a NaN
    map thresholds to "no defect" everywhere and would read as IoU 0 (or 1 on a defect-free image)."""
    out = np.asarray(runner.infer(preprocess(images, runner.spec)))
    finite = np.isfinite(out.reshape(len(images), -1)).all(axis=1)
    if not finite.all():
        i = int(np.argmin(finite))
        which = names[i] if names else f"image {i}"
        bad = out[i]
        kinds = " and ".join(w for w, c in (("NaN", np.isnan(bad).any()), ("Inf", np.isinf(bad).any())) if c)
        raise EdgekitError(f"{runner.describe()} outputs {kinds} on {which} "
                           f"({int((~np.isfinite(bad)).sum()):,} of {bad.size:,} values); no score given")
    # back to each image's size the way it came in (letterbox: the padding cut off first)
    return [resize_probs(out[i, 0], img.shape, runner.spec) for i, img in enumerate(images)]


def note_stretching(note: Callable[[str], None], shapes, runner: Runner) -> bool:
    """Tell ``note`` (once: True when said) that these images are stretched to another aspect ratio."""
    line = aspect_note(shapes, runner.spec)
    if line:
        note(line)
    return bool(line)


def evaluate(runner: Runner, dataset: SegDataset, batch_size: int = 4, show_progress: bool = True,
             limit: int | None = None, note: Optional[Callable[[str], None]] = None, desc: str = "eval") -> dict:
    """MAE, IoU and max F of ``runner`` on ``dataset`` (overall and per class); ``desc`` names the progress bar;
    ``note``: told once when the images are stretched to another aspect ratio (``aspect_note``)."""
    samples = limit_samples(dataset.samples, limit)  # N images across all classes
    if not any(s.mask_path is not None or s._mask is not None for s in samples):
        raise EdgekitError(f"{dataset.description}: no ground-truth masks to evaluate against")
    metrics = SegMetrics()
    with progress(total=len(samples), desc=desc, enabled=show_progress) as bar:
        for group in batches(samples, batch_size):
            loaded = [s.load() for s in group]
            said = note is not None and note_stretching(note, [img.shape for img, _ in loaded], runner)
            note = None if said else note
            probs = predict_probs(runner, [img for img, _ in loaded], [s.name for s in group])
            for s, (img, mask), p in zip(group, loaded, probs):
                if mask is not None:
                    metrics.add(p, mask, s.cls)
            bar.update(len(group))
    summary = metrics.summary()
    summary["data"] = dataset.description
    summary["synthetic"] = dataset.synthetic
    summary["model"] = runner.describe()
    return summary
