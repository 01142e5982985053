"""The health check a device runs before an update is final.

At packaging time (``edgekit package --samples IMAGES``) a few sample images are run through the adapter on
the backbone it was trained on, and the images (lossless PNG bytes of the grayscale arrays) and the
adapter's outputs (the logits of every head) are stored in the package as ``health.safetensors``. On the
device, after the install switch, the adapter in service is loaded with the *deployed* backbone (compiled
artifact or checkpoint; on a compiled artifact the adapter runs in numpy, ``edgekit.mlff.heads``, so a
station checks without torch), run on those images, and compared with the recorded outputs: the top-1 class of
every head must agree on at least ``min_top1_agreement`` of the images and the largest logit difference
must stay within ``rtol`` of the recorded logits' range. Anything else (a backbone the adapter does not fit,
damaged weights, another preprocessing) fails the check, and ``edgekit update`` discards the trial and blocks
the version (``edgekit.device.state``).

The check fails closed: a health entry that does not match the health data (a sample too many or too few,
malformed tolerances or head sizes), recorded or computed outputs that are not finite (NaN, Inf), and any
exception while it runs (MemoryError, a RuntimeError from the adapter, an OSError such as ENOSPC) are a *failed*
check whose one-line reason names what failed; ``check_health`` never raises.

health.safetensors: tensors ``image.<i>`` (uint8, PNG bytes) and ``logits`` (float32, N x outputs); its
metadata header holds ``format``; the package manifest's ``health`` entry the image count, head sizes and
tolerances (signed with the manifest).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from edgekit.errors import EdgekitError

HEALTH_FORMAT = "edgekit-health"
DEFAULT_RTOL = 0.05  # of the recorded logits' range: fp32/bf16 artifacts sit far below, a wrong backbone far above
DEFAULT_MIN_AGREEMENT = 1.0
# The device's own limits on the signed tolerances: a package may ask for a stricter check, never for one so
# loose that a wrong backbone or adapter passes (rtol 1e9 made any output pass). 5x the default rtol leaves room
# for low-precision compiled backbones; below half the samples agreeing the check says nothing.
MAX_RTOL = 0.25
MIN_TOP1_AGREEMENT_FLOOR = 0.5
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


def adapter_logits(backbone, tensors: Dict[str, np.ndarray], meta: dict, images: Sequence[np.ndarray]) -> np.ndarray:
    """Logits of every head of an MLFF adapter on ``images`` with ``backbone``, concatenated (N x outputs).

    ``tensors``: the adapter's weights (numpy arrays, or torch tensors). On a compiled backbone
    (``CompiledBackbone``) the heads run in numpy, without torch; on the PyTorch backbone, in PyTorch."""
    from edgekit.mlff.heads import head_logits
    from edgekit.mlff.runner import CompiledBackbone

    if meta.get("model") != "mlff-adapter" or "config" not in meta or "tap_dims" not in meta["config"]:
        raise EdgekitError("the health check needs an MLFF adapter (edgekit adapt); this adapter is not one")
    if isinstance(backbone, CompiledBackbone):
        from edgekit.mlff.heads import NumpyAdapter

        arrays = {k: v if isinstance(v, np.ndarray) else v.detach().cpu().numpy() for k, v in tensors.items()}
        adapter = NumpyAdapter(arrays, meta["config"])
    else:
        from edgekit.models.mlff import adapter_from_tensors

        adapter = adapter_from_tensors(tensors, meta["config"])
    if list(backbone.tap_dims) != list(meta["config"]["tap_dims"]):
        raise EdgekitError(f"backbone {backbone.id} gives taps {backbone.tap_dims}, the adapter reads "
                           f"{meta['config']['tap_dims']}")
    feats = backbone.pooled(backbone.preprocess(list(images)))
    return np.concatenate(head_logits(adapter, feats), axis=1)


def record_health(adapter_dir: str | os.PathLike, backbone, image_paths: Sequence[str | os.PathLike],
                  rtol: float = DEFAULT_RTOL, min_top1_agreement: float = DEFAULT_MIN_AGREEMENT):
    """``(health.safetensors bytes, manifest info)`` for an adapter folder, on the backbone it was trained on."""
    import safetensors.numpy

    from edgekit.data.images import read_gray
    from edgekit.mlff.adapter import load_adapter_arrays

    if not image_paths:
        raise EdgekitError("--samples: no images")
    if len(image_paths) > MAX_SAMPLES:
        raise EdgekitError(f"--samples: {len(image_paths)} images, at most {MAX_SAMPLES} go into a package")
    if not (0 < rtol <= MAX_RTOL) or not (MIN_TOP1_AGREEMENT_FLOOR <= min_top1_agreement <= 1):
        raise EdgekitError(f"health tolerances: rtol must be in (0, {MAX_RTOL}] and min_top1_agreement in "
                           f"[{MIN_TOP1_AGREEMENT_FLOOR}, 1] (a device refuses looser ones)")
    tensors, meta = load_adapter_arrays(adapter_dir)
    if (backbone.id, backbone.weights_sha256) != (meta["backbone"], meta["backbone_sha256"]):
        raise EdgekitError(f"--backbone {backbone.id} is not the backbone adapter {adapter_dir} was trained on "
                           f"({meta['backbone']})")
    grays = [read_gray(p) for p in image_paths]
    pngs = [_png(g) for g in grays]
    images = [_unpng(b) for b in pngs]  # what the device will decode, bit for bit
    logits = adapter_logits(backbone, tensors, meta, images)
    out = {f"image.{i}": np.frombuffer(b, dtype=np.uint8).copy() for i, b in enumerate(pngs)}
    out["logits"] = np.ascontiguousarray(logits, dtype=np.float32)
    head_sizes = [int(n) for n in meta["config"]["head_sizes"]]
    data = safetensors.numpy.save(out, metadata={"format": HEALTH_FORMAT})
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


def _fail(result: dict, reason: str) -> dict:
    return {**result, "ok": False, "reason": reason}


def _health_entry(info, recorded: Dict[str, np.ndarray]) -> dict:
    """The manifest's health entry, checked against the health data it describes; EdgekitError names the fault."""
    if not isinstance(info, dict):
        raise EdgekitError("the manifest's health entry is not an object")
    try:
        n, outputs = info["images"], info["outputs"]
        rtol, agreement, head_sizes = info["rtol"], info["min_top1_agreement"], info["head_sizes"]
    except KeyError as e:
        raise EdgekitError(f"the manifest's health entry has no {e.args[0]!r}") from None
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_SAMPLES:
        raise EdgekitError(f"the manifest's health entry names {n!r} images (1 to {MAX_SAMPLES})")
    if not isinstance(head_sizes, list) or not head_sizes or not all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in head_sizes):
        raise EdgekitError(f"the manifest's health entry has malformed head_sizes {head_sizes!r}")
    if not isinstance(outputs, int) or outputs != sum(head_sizes):
        raise EdgekitError(f"the manifest's health entry says {outputs!r} outputs, its heads add up to "
                           f"{sum(head_sizes)}")
    for name, value, ok in (("rtol", rtol, lambda v: v > 0), ("min_top1_agreement", agreement, lambda v: 0 < v <= 1)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value) or not ok(value):
            raise EdgekitError(f"the manifest's health entry has an invalid {name} {value!r}")
    if rtol > MAX_RTOL or agreement < MIN_TOP1_AGREEMENT_FLOOR:
        raise EdgekitError(f"the manifest's health entry (rtol {rtol!r}, min_top1_agreement {agreement!r}) is looser "
                           f"than this device accepts (rtol at most {MAX_RTOL}, agreement at least "
                           f"{MIN_TOP1_AGREEMENT_FLOOR})")
    missing = [f"image.{i}" for i in range(n) if f"image.{i}" not in recorded]
    if missing:
        raise EdgekitError(f"health sample {missing[0]} is missing from {HEALTH_NAME_FOR_MESSAGES} (the manifest's "
                           f"health entry names {n} images)")
    if "logits" not in recorded:
        raise EdgekitError(f"{HEALTH_NAME_FOR_MESSAGES} holds no recorded logits")
    logits = recorded["logits"]
    if tuple(logits.shape) != (n, outputs):
        raise EdgekitError(f"recorded logits are {list(logits.shape)}, the health entry says [{n}, {outputs}]")
    return {"images": n, "outputs": outputs, "rtol": float(rtol), "min_top1_agreement": float(agreement),
            "head_sizes": head_sizes}


def _first_non_finite(values: np.ndarray, what: str) -> Optional[str]:
    bad = np.argwhere(~np.isfinite(values))
    if not len(bad):
        return None
    i, j = (int(x) for x in bad[0])
    return f"{what} are not finite ({values[i, j]} at sample {i}, output {j}; {len(bad)} value(s) in all)"


def check_health(version_dir: str | os.PathLike, backbone) -> dict:
    """Run the adapter in ``version_dir`` (an installed or trial version) with ``backbone`` on its recorded samples.

    Returns {"ok", "images", "top1_agreement", "max_abs_diff", "tolerance", "reason"}. Never raises: any failure,
    of any type, is a failed check with a one-line reason (fails closed).
    """
    result = {"images": None, "tolerance": None, "max_abs_diff": None, "top1_agreement": None}
    try:
        return _check_health(Path(version_dir), backbone, result)
    except EdgekitError as e:
        return _fail(result, str(e))
    except Exception as e:  # noqa: BLE001 - fail closed: MemoryError, RuntimeError, OSError (ENOSPC), ...
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return _fail(result, f"{type(e).__name__} while running the health check" + (f": {text}" if text else ""))


HEALTH_NAME_FOR_MESSAGES = "health.safetensors"


def _check_health(folder: Path, backbone, result: dict) -> dict:
    import safetensors.numpy

    from edgekit.mlff.adapter import load_adapter_arrays
    from edgekit.ota.package import HEALTH_NAME, MANIFEST_NAME

    manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    if not manifest.get("health") or not (folder / HEALTH_NAME).is_file():
        raise EdgekitError(f"{folder}: the package carries no health samples")
    try:
        recorded = safetensors.numpy.load((folder / HEALTH_NAME).read_bytes())
    except Exception as e:  # noqa: BLE001 - a damaged file is a failed check
        raise EdgekitError(f"{HEALTH_NAME} is unreadable ({type(e).__name__})") from None
    info = _health_entry(manifest["health"], recorded)
    n = info["images"]
    result = {**result, "images": n}
    images = [_unpng(np.asarray(recorded[f"image.{i}"]).tobytes()) for i in range(n)]
    want = np.asarray(recorded["logits"]).astype(np.float32)
    bad = _first_non_finite(want, "recorded logits")
    if bad:
        return _fail(result, bad)
    tensors, meta = load_adapter_arrays(folder)
    got = np.asarray(adapter_logits(backbone, tensors, meta, images), dtype=np.float32)
    if got.shape != want.shape:
        return _fail(result, f"outputs {list(got.shape)}, recorded {list(want.shape)}")
    bad = _first_non_finite(got, "the adapter's outputs")
    if bad:
        return _fail(result, bad)
    head_sizes = info["head_sizes"]
    scale = float(want.max() - want.min()) or 1.0
    tol = info["rtol"] * scale
    diff = float(np.abs(got - want).max())
    agree = float((_top1_per_head(got, head_sizes) == _top1_per_head(want, head_sizes)).all(axis=1).mean())
    ok = diff <= tol and agree >= info["min_top1_agreement"]
    reason = None if ok else (f"outputs differ from those recorded at packaging (max abs diff {diff:.4g} > "
                              f"{tol:.4g}, or top-1 agreement {agree:.2f} < {info['min_top1_agreement']})")
    return {**result, "ok": ok, "tolerance": tol, "max_abs_diff": diff, "top1_agreement": agree, "reason": reason}
