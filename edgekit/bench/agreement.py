"""Agreement of a deployed row with the PyTorch model it came from, on the same images.

On synthetic images an IoU against the generator's masks says little about the product (the embedded
model was never trained on them), but whether a compiled artifact still computes what its PyTorch
model computes is exactly what deployment must preserve, on any images. Per image: the IoU of the two
binary masks (``prob >= 0.5``; 1.0 when both are empty), the fraction of pixels whose mask label
agrees, and the largest absolute difference of the probabilities; over the images: the mean IoU, the
mean pixel agreement, the largest difference and the mean absolute difference.

The reference of a row is the PyTorch model of its source checkpoint: the checkpoint itself for rows
built from one, the checkpoint an artifact's manifest names (``source.path``, when it is still there
with the recorded sha256) for artifacts given alone; none for plain model files and served models.
"""
from __future__ import annotations

import importlib.util

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from edgekit.artifact import is_artifact, read_manifest
from edgekit.backends.registry import spec_for_model_file
from edgekit.errors import EdgekitError
from edgekit.utils import sha256_file


@dataclass(frozen=True)
class Reference:
    """Where a row's PyTorch reference comes from: a checkpoint, or why there is none."""
    checkpoint: Optional[Path]
    note: str = ""


def reference_for(path: Optional[Path]) -> Reference:
    """The PyTorch reference of the model at ``path`` (None: a served model)."""
    if path is None:
        return Reference(None, "a served model records no source checkpoint here")
    path = Path(path)
    if is_artifact(path):
        try:
            src = read_manifest(path, verify=False).get("source") or {}
        except EdgekitError as e:
            return Reference(None, f"its manifest is unreadable ({e})")
        ck, sha = src.get("path"), src.get("sha256")
        if not ck:
            return Reference(None, "its manifest names no source checkpoint")
        if not Path(ck).is_file():
            return Reference(None, f"its source checkpoint {ck} is not on this machine")
        if sha and sha256_file(Path(ck)) != sha:
            return Reference(None, f"its source checkpoint {ck} has changed since it was compiled")
        if importlib.util.find_spec("torch") is None:  # a station (runtime-only install) runs no PyTorch
            return Reference(None, "PyTorch is not installed here (edgekit[build]), so its source checkpoint "
                                   "cannot be run as the reference")
        return Reference(Path(ck))
    if spec_for_model_file(path) is not None:
        return Reference(None, "a plain model file records no source checkpoint")
    return Reference(path)


def image_agreement(prob: np.ndarray, ref: np.ndarray) -> Tuple[float, float, float, float]:
    """(mask IoU, pixel agreement, max |prob - ref|, mean |prob - ref|) of one image."""
    prob, ref = np.asarray(prob, dtype=np.float32), np.asarray(ref, dtype=np.float32)
    a, b = prob >= 0.5, ref >= 0.5
    union = np.logical_or(a, b).sum()
    iou = float(np.logical_and(a, b).sum() / union) if union else 1.0
    diff = np.abs(prob - ref)
    return iou, float((a == b).mean()), float(diff.max()), float(diff.mean())


def summarize_agreement(per_image: Sequence[Tuple[float, float, float, float]]) -> dict:
    """The row's figures from its per-image ``image_agreement`` tuples."""
    if not per_image:
        raise ValueError("no images to judge agreement on")
    v = np.asarray(per_image, dtype=np.float64)
    return {"mask_iou": float(v[:, 0].mean()), "pixel_agreement": float(v[:, 1].mean()),
            "max_abs_prob_diff": float(v[:, 2].max()), "mean_abs_prob_diff": float(v[:, 3].mean()),
            "images": int(len(v))}


def agreement(probs: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> dict:
    """A row's agreement with its reference over the same images, in the same order."""
    if len(probs) != len(refs):
        raise ValueError("agreement needs one reference map per image")
    return summarize_agreement([image_agreement(p, r) for p, r in zip(probs, refs)])


def format_agreement(a: Optional[dict], is_reference: bool = False) -> str:
    """'0.9987 / 99.99% / 0.012' (mask IoU / pixels / max |dprob|), 'reference', or '-'."""
    if is_reference:
        return "reference"
    if not a:
        return "-"
    return f"{a['mask_iou']:.4f} / {a['pixel_agreement']:.2%} / {a['max_abs_prob_diff']:.3f}"
