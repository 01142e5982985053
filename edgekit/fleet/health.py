"""The health check a device runs before an update is final.

At packaging time (``edgekit package --samples IMAGES``) a few sample images are run through the adapter on
the backbone it was trained on, and the images (lossless PNG bytes of the grayscale arrays) and the
adapter's outputs (the logits of every head) are stored in the package as ``health.safetensors``. On the
device, after the install switch, the adapter in service is loaded with the *deployed* backbone (compiled
artifact or checkpoint), run on those images, and compared with the recorded outputs: the top-1 class of
every head must agree on at least ``min_top1_agreement`` of the images and the largest logit difference
must stay within ``rtol`` of the recorded logits' range. Anything else (a backbone the adapter does not fit,
damaged weights, another preprocessing) fails the check, and ``edgekit update`` rolls back.

health.safetensors: tensors ``image.<i>`` (uint8, PNG bytes) and ``logits`` (float32, N x outputs); its
metadata header holds ``format``; the package manifest's ``health`` entry the image count, head sizes and
tolerances (signed with the manifest).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from edgekit.errors import EdgekitError

HEALTH_FORMAT = "edgekit-health"
DEFAULT_RTOL = 0.05  # of the recorded logits' range: fp32/bf16 artifacts sit far below, a wrong backbone far above
DEFAULT_MIN_AGREEMENT = 1.0
MAX_SAMPLES = 16


def _png(gray: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _unpng(data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG" or im.mode != "L":
                raise EdgekitError("health sample is not a grayscale PNG")
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError):
        raise EdgekitError("health sample is not a readable PNG") from None


def adapter_logits(backbone, tensors: Dict[str, torch.Tensor], meta: dict, images: Sequence[np.ndarray]) -> np.ndarray:
    """Logits of every head of an MLFF adapter on ``images`` with ``backbone``, concatenated (N x outputs)."""
    from edgekit.models.mlff import adapter_from_tensors

    if meta.get("model") != "mlff-adapter" or "config" not in meta or "tap_dims" not in meta["config"]:
        raise EdgekitError("the health check needs an MLFF adapter (edgekit adapt); this adapter is not one")
    adapter = adapter_from_tensors(tensors, meta["config"])
    if list(backbone.tap_dims) != list(meta["config"]["tap_dims"]):
        raise EdgekitError(f"backbone {backbone.id} gives taps {backbone.tap_dims}, the adapter reads "
                           f"{meta['config']['tap_dims']}")
    with torch.inference_mode():
        z = adapter.embed(backbone.pooled(backbone.preprocess(list(images))).float())
        return torch.cat([h(z) for h in adapter.heads], dim=1).numpy()


def record_health(adapter_dir: str | os.PathLike, backbone, image_paths: Sequence[str | os.PathLike],
                  rtol: float = DEFAULT_RTOL, min_top1_agreement: float = DEFAULT_MIN_AGREEMENT):
    """``(health.safetensors bytes, manifest info)`` for an adapter folder, on the backbone it was trained on."""
    import safetensors.torch

    from edgekit.data.images import read_gray
    from edgekit.mlff.adapter import load_adapter

    if not image_paths:
        raise EdgekitError("--samples: no images")
    if len(image_paths) > MAX_SAMPLES:
        raise EdgekitError(f"--samples: {len(image_paths)} images, at most {MAX_SAMPLES} go into a package")
    if not (0 < rtol) or not (0 < min_top1_agreement <= 1):
        raise EdgekitError("health tolerances: rtol must be > 0 and min_top1_agreement in (0, 1]")
    tensors, meta = load_adapter(adapter_dir)
    if (backbone.id, backbone.weights_sha256) != (meta["backbone"], meta["backbone_sha256"]):
        raise EdgekitError(f"--backbone {backbone.id} is not the backbone adapter {adapter_dir} was trained on "
                           f"({meta['backbone']})")
    grays = [read_gray(p) for p in image_paths]
    pngs = [_png(g) for g in grays]
    images = [_unpng(b) for b in pngs]  # what the device will decode, bit for bit
    logits = adapter_logits(backbone, tensors, meta, images)
    out = {f"image.{i}": torch.frombuffer(bytearray(b), dtype=torch.uint8) for i, b in enumerate(pngs)}
    out["logits"] = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    head_sizes = [int(n) for n in meta["config"]["head_sizes"]]
    data = safetensors.torch.save(out, metadata={"format": HEALTH_FORMAT})
    info = {"images": len(images), "outputs": int(logits.shape[1]), "rtol": float(rtol),
            "min_top1_agreement": float(min_top1_agreement), "head_sizes": head_sizes,
            "recorded_on": meta["backbone"]}
    return data, info


def _top1_per_head(logits: np.ndarray, head_sizes: List[int]) -> np.ndarray:
    cols, start = [], 0
    for n in head_sizes:
        cols.append(logits[:, start:start + n].argmax(axis=1))
        start += n
    return np.stack(cols, axis=1)


def check_health(version_dir: str | os.PathLike, backbone) -> dict:
    """Run the adapter in ``version_dir`` (an installed version) with ``backbone`` on its recorded samples.

    Returns {"ok", "images", "top1_agreement", "max_abs_diff", "tolerance", "reason"}; never raises for a
    failing adapter (a failure is a result), only for a version folder without health data.
    """
    import safetensors.torch

    from edgekit.mlff.adapter import load_adapter
    from edgekit.ota.package import HEALTH_NAME, MANIFEST_NAME

    folder = Path(version_dir)
    manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    info = manifest.get("health")
    if not info or not (folder / HEALTH_NAME).is_file():
        raise EdgekitError(f"{folder}: the package carries no health samples")
    data = (folder / HEALTH_NAME).read_bytes()
    recorded = safetensors.torch.load(data)
    n = int(info["images"])
    images = [_unpng(recorded[f"image.{i}"].numpy().tobytes()) for i in range(n)]
    want = recorded["logits"].numpy()
    head_sizes = [int(h) for h in info["head_sizes"]]
    result = {"images": n, "tolerance": None, "max_abs_diff": None, "top1_agreement": None}
    try:
        tensors, meta = load_adapter(folder)
        got = adapter_logits(backbone, tensors, meta, images)
    except EdgekitError as e:
        return {**result, "ok": False, "reason": str(e)}
    if got.shape != want.shape:
        return {**result, "ok": False, "reason": f"outputs {list(got.shape)}, recorded {list(want.shape)}"}
    scale = float(want.max() - want.min()) or 1.0
    tol = float(info["rtol"]) * scale
    diff = float(np.abs(got - want).max())
    agree = float((_top1_per_head(got, head_sizes) == _top1_per_head(want, head_sizes)).all(axis=1).mean())
    ok = bool(np.isfinite(got).all()) and diff <= tol and agree >= float(info["min_top1_agreement"])
    reason = None if ok else (f"outputs differ from those recorded at packaging (max abs diff {diff:.4g} > "
                              f"{tol:.4g}, or top-1 agreement {agree:.2f} < {info['min_top1_agreement']})")
    return {**result, "ok": ok, "tolerance": tol, "max_abs_diff": diff, "top1_agreement": agree, "reason": reason}
