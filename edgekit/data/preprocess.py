"""Input preprocessing and output postprocessing, described by a spec that travels with the model.

The published GMBINet expects: grayscale image -> float, divided by its own maximum ->
``(x - 0.4669) / 0.2437`` -> the channel replicated to 3 -> bilinear resize to 512x512. Its main
output (already a sigmoid probability) is resized back to the image size, bilinearly.

``resize`` says how an image reaches ``input_size``: ``stretch`` (what the published checkpoint was
trained with: any aspect ratio is stretched to the input's) or ``letterbox`` (scaled to fit, aspect
ratio kept, centred, the rest padded with 0 after normalisation, i.e. the mean intensity). The output
is mapped back the same way: the padding cut off, then resized to the image size. Both run in numpy
(no torch: a device runs this without it) and give what ``torch.nn.functional.interpolate`` (bilinear,
``align_corners=False``) gives.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Optional, Sequence, Tuple

import numpy as np

from edgekit.errors import EdgekitError


MAX_INPUT_SIDE = 4096  # pixels per side of the network input; SD-900 models run at 512
RESIZE_MODES = ("stretch", "letterbox")
ASPECT_TOLERANCE = 0.02  # relative aspect-ratio difference under which stretching is not worth a note


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v) and v == int(v)


@dataclass
class PreprocessSpec:
    mean: float = 0.4669
    std: float = 0.2437
    input_size: Tuple[int, int] = (512, 512)  # (height, width) fed to the network
    channels: int = 3  # grayscale is replicated to this many channels
    scale: str = "max"  # "max": divide by the image's own maximum; "255": divide by 255
    resize: str = "stretch"  # how an image reaches input_size: "stretch" or "letterbox" (RESIZE_MODES)

    def __post_init__(self):
        # A spec is read from checkpoints and manifests, i.e. untrusted input: bounded before any
        # buffer is sized from it (an input of 60,000 x 60,000 would be a 43 GB batch).
        size = self.input_size
        if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int(v) for v in size):
            raise EdgekitError(f"preprocess input_size must be [height, width] integers, not {size!r}"[:200])
        self.input_size = tuple(int(v) for v in size)
        if not all(1 <= v <= MAX_INPUT_SIDE for v in self.input_size):
            raise EdgekitError(f"preprocess input_size {list(self.input_size)} is outside 1..{MAX_INPUT_SIDE} per side")
        if not _is_int(self.channels) or not 1 <= int(self.channels) <= 64:
            raise EdgekitError(f"preprocess channels must be an integer in 1..64, not {self.channels!r}"[:200])
        self.channels = int(self.channels)
        for name in ("mean", "std"):
            # one number, or one per channel: an MLFF backbone's spec carries ImageNet's per-channel
            # mean/std (edgekit.mlff.runner.backbone_preprocess_dict); refusing those made every
            # `edgekit compile REGISTRY` fail with "preprocess mean must be a finite number"
            v = getattr(self, name)
            values = list(v) if isinstance(v, (list, tuple)) and len(v) == self.channels else [v]
            if any(isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or abs(x) > 1e6
                   for x in values):
                raise EdgekitError(f"preprocess {name} must be a finite number or one per channel, not {v!r}"[:200])
            if name == "std" and any(x <= 0 for x in values):
                raise EdgekitError(f"preprocess std must be > 0, not {v!r}"[:200])
            if isinstance(v, (list, tuple)):
                setattr(self, name, [float(x) for x in values])
        if self.scale not in ("max", "255"):
            raise EdgekitError(f"preprocess scale must be 'max' or '255', not {self.scale!r}"[:200])
        if self.resize not in RESIZE_MODES:
            raise EdgekitError(f"preprocess resize must be {' or '.join(map(repr, RESIZE_MODES))}, "
                               f"not {self.resize!r}"[:200])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        if not isinstance(d, dict):
            raise EdgekitError(f"preprocess must be a mapping, not {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def parse_size(text) -> Tuple[int, int]:
    """``"HxW"`` or ``"N"`` (= NxN) -> (height, width), each in 1..MAX_INPUT_SIDE; one error line otherwise."""
    t = str(text).strip().lower()
    parts = t.split("x") if "x" in t else [t, t]
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise EdgekitError(f"a size is HxW or N (e.g. 320x480 or 256), not {text!r}"[:200])
    h, w = (int(p) for p in parts)
    if not (1 <= h <= MAX_INPUT_SIDE and 1 <= w <= MAX_INPUT_SIDE):
        raise EdgekitError(f"size {h}x{w} is outside 1..{MAX_INPUT_SIDE} per side")
    return h, w


def letterbox_box(image_size: Tuple[int, int], input_size: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """(top, left, height, width) of an ``image_size`` image scaled to fit ``input_size`` with its aspect
    ratio kept, centred: where ``letterbox`` puts the image, and what it cuts out of the output."""
    (h, w), (H, W) = image_size, input_size
    s = min(H / h, W / w)
    nh, nw = min(H, max(1, int(round(h * s)))), min(W, max(1, int(round(w * s))))
    return (H - nh) // 2, (W - nw) // 2, nh, nw


def _source_index(in_size: int, out_size: int):
    """Per output pixel along one axis: the two source pixels and their weights, exactly as PyTorch's
    bilinear ``interpolate(..., align_corners=False)`` computes them on the CPU (in float32, the same
    operations in the same order), so this numpy path gives PyTorch's numbers."""
    i = np.arange(out_size)
    if in_size == out_size:
        return i, i, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    # scale * (i + 0.5) - 0.5 is one fused multiply-add in PyTorch's kernel (rounded once): done in float64 and
    # rounded to float32 here; rounding the product first moved positions by an ulp (6e-5 in the output)
    src = (np.float64(scale) * (i.astype(np.float32) + np.float32(0.5)).astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, (np.float32(1) - lam1).astype(np.float32), lam1


def resize_bilinear(a: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """A float32 ``... x H x W`` array -> ``... x h x w``, bilinear, half-pixel centres (PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=False)``, no antialiasing), in numpy: along the width
    first, then the height, as PyTorch does."""
    a = np.asarray(a, dtype=np.float32)
    h, w = (int(v) for v in size)
    if a.shape[-2:] == (h, w):
        return a.copy()
    y0, y1, wy0, wy1 = _source_index(a.shape[-2], h)
    x0, x1, wx0, wx1 = _source_index(a.shape[-1], w)
    rows0, rows1 = a[..., y0, :], a[..., y1, :]
    top = rows0[..., x0] * wx0 + rows0[..., x1] * wx1
    bottom = rows1[..., x0] * wx0 + rows1[..., x1] * wx1
    return (top * wy0[:, None] + bottom * wy1[:, None]).astype(np.float32, copy=False)


def _place(x: np.ndarray, spec: "PreprocessSpec") -> np.ndarray:
    """A normalised ``C x h x w`` image -> ``C x H x W`` at ``spec.input_size``: stretched, or letterboxed
    (scaled to fit, aspect kept, centred, padded with 0 = the mean after normalisation)."""
    if spec.resize == "stretch":
        return resize_bilinear(x, spec.input_size)
    top, left, nh, nw = letterbox_box(x.shape[-2:], spec.input_size)
    out = np.zeros((x.shape[0], *spec.input_size), dtype=np.float32)
    out[:, top:top + nh, left:left + nw] = resize_bilinear(x, (nh, nw))
    return out


def aspect_note(image_sizes, spec: "PreprocessSpec") -> Optional[str]:
    """One line when ``spec`` stretches an image of another aspect ratio than its input (the first such
    ``(height, width)`` named), else None: stretching changes the shape of every defect."""
    if spec.resize != "stretch":
        return None
    H, W = spec.input_size
    for h, w in image_sizes:
        if abs((w / h) / (W / H) - 1) > ASPECT_TOLERANCE:
            return (f"note: {w}x{h} images (aspect {w / h:.2f}:1) are stretched to the model's {W}x{H} input "
                    f"(aspect {W / H:.2f}:1), as its preprocessing says (resize: stretch); to keep the aspect "
                    "ratio, fine-tune with `edgekit train ... --resize letterbox` (README: Your own product)")
    return None


def preprocess(images: Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Grayscale uint8 images (any sizes) -> float32 batch ``N x C x H x W`` at ``spec.input_size``."""
    out = np.empty((len(images), spec.channels, *spec.input_size), dtype=np.float32)
    per_channel = isinstance(spec.mean, list) or isinstance(spec.std, list)
    for i, img in enumerate(images):
        x = np.asarray(img, dtype=np.float32)
        if spec.scale == "max":
            m = float(x.max())
            x = x / np.float32(m) if m > 0 else x
        else:
            x = x / np.float32(255.0)
        if per_channel:  # one per channel: replicated first, then each channel its own mean/std
            mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
            std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
            if spec.resize == "stretch":
                out[i] = (resize_bilinear(x, spec.input_size)[None] - mean) / std
            else:  # normalised before placing: the padding is 0 in every channel
                out[i] = _place(np.broadcast_to(x, (spec.channels, *x.shape)) - mean, spec) / std
            continue
        x = (x - np.float32(spec.mean)) / np.float32(spec.std)
        out[i] = _place(x[None], spec)  # broadcast to every channel
    return out


def resize_probs(probs: np.ndarray, size: Tuple[int, int], spec: Optional[PreprocessSpec] = None) -> np.ndarray:
    """One ``H x W`` (or ``1 x H x W``) probability map at the network's output -> the image's ``size``,
    bilinear, clipped to [0, 1]. With a letterbox ``spec``, the padding is cut off first."""
    p = np.ascontiguousarray(probs, dtype=np.float32).reshape(probs.shape[-2:])
    if spec is not None and spec.resize == "letterbox":
        top, left, nh, nw = letterbox_box(tuple(size), p.shape)
        p = p[top:top + nh, left:left + nw]
    if tuple(p.shape) != tuple(size):
        p = resize_bilinear(p, size)
    return np.clip(p, 0, 1)
