"""Reading and writing images, with one clear error for anything that is not an image."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgekit.errors import EdgekitError
from edgekit.utils import atomic_write

IMAGE_EXTS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


def is_image_name(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTS)


def expand_image_paths(inputs, recursive: bool = False, unique_stems: bool = False):
    """Files as given; folders expand to the images inside them (sorted, optionally recursive), leaving
    out the masks kept beside their images (``x.jpg`` + ``x.png`` or ``x_mask.png``: a folder ``--data``
    reads as images with masks is the same images here).

    ``unique_stems`` refuses two inputs with the same name, whose outputs would overwrite each other.
    """
    from edgekit.data.datasets import split_masks_beside_images

    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in (p.rglob("*") if recursive else p.iterdir()) if q.is_file() and is_image_name(q))
            if not found:
                raise EdgekitError(f"no images in {p}")
            paths += split_masks_beside_images(found)[0]
        elif p.exists():
            paths.append(p)
        else:
            raise EdgekitError(f"image not found: {p}")
    if not paths:
        raise EdgekitError("no input images given")
    if unique_stems:
        seen = set()
        for p in paths:
            if p.stem in seen:
                raise EdgekitError(f"two inputs share the name {p.stem!r}; their outputs would overwrite each other")
            seen.add(p.stem)
    return paths


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """An image file -> ``H x W`` uint8 grayscale (colour images are converted with ITU-R 601 luma)."""
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"image not found: {path}")
    return _decode_gray(path, str(path))


def decode_gray(data: bytes, what: str = "the image") -> np.ndarray:
    """Encoded image bytes (an HTTP upload) -> ``H x W`` uint8 grayscale, as :func:`read_gray` reads a file."""
    return _decode_gray(io.BytesIO(data), what)


def _decode_gray(source, what: str) -> np.ndarray:
    try:
        with Image.open(source) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I", "F"):
                a = np.asarray(im, dtype=np.float32)
                return np.clip(a / max(float(a.max()), 1.0) * 255.0, 0, 255).astype(np.uint8)
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise EdgekitError(f"cannot read image {what}: not a readable image file") from None


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask image -> ``H x W`` bool (any non-zero pixel is foreground... above half the maximum)."""
    g = read_gray(path)
    return g > 127 if g.max() > 1 else g > 0


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 ``H x W`` or ``H x W x 3`` array as PNG, atomically."""
    with atomic_write(path, "wb") as f:
        Image.fromarray(np.ascontiguousarray(array)).save(f, format="PNG")
