"""Dataset readers: SD-Saliency-900, generic image/mask folder pairs, class-per-folder sets, and the
embedded synthetic generator, all behind one small ``SegSample`` shape."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from edgekit.data.images import is_image_name, read_gray, read_mask
from edgekit.errors import EdgekitError

SPLITS = ("train", "val", "test", "all")


@dataclass
class SegSample:
    name: str
    cls: str
    image_path: Optional[Path] = None
    mask_path: Optional[Path] = None
    _image: Optional[np.ndarray] = None
    _mask: Optional[np.ndarray] = None

    def image(self) -> np.ndarray:
        return self._image if self._image is not None else read_gray(self.image_path)

    def mask(self) -> Optional[np.ndarray]:
        if self._mask is not None:
            return self._mask
        return read_mask(self.mask_path) if self.mask_path is not None else None

    def load(self) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Image and mask, checked to have the same size."""
        img, mask = self.image(), self.mask()
        if mask is not None and mask.shape != img.shape:
            where = self.mask_path or self.name
            raise EdgekitError(
                f"mask {where} is {mask.shape[1]}x{mask.shape[0]} but its image is {img.shape[1]}x{img.shape[0]}")
        return img, mask


@dataclass
class SegDataset:
    samples: List[SegSample]
    classes: List[str]
    description: str
    synthetic: bool = False
    # What the images are, for reports that must say which data a figure is on (bench captions).
    name: str = ""   # "SD-Saliency-900", "synthetic steel defects", "image/mask folders"
    split: str = ""  # the split or seed the samples come from

    def __len__(self):
        return len(self.samples)


def limit_samples(samples: Sequence[SegSample], n: Optional[int]) -> List[SegSample]:
    """At most ``n`` samples, taken round-robin over the classes (so a limit keeps every class: the
    SD-900 lists are sorted by class, and their first 100 are all inclusions)."""
    if not n or n >= len(samples):
        return list(samples)
    by_cls: Dict[str, List[SegSample]] = defaultdict(list)
    for s in samples:
        by_cls[s.cls].append(s)
    queues = [list(v) for _, v in sorted(by_cls.items())]
    out: List[SegSample] = []
    i = 0
    while len(out) < n:
        q = queues[i % len(queues)]
        if q:
            out.append(q.pop(0))
        i += 1
    return out



def _images_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_name(p))


def _prefix_class(stem: str) -> str:
    return stem.split("_")[0] if "_" in stem else "all"


def is_sd900(root: Path) -> bool:
    """The SD-Saliency-900 layout (its images and masks folders): the one place that says so."""
    root = Path(root)
    return (root / "Source Images").is_dir() and (root / "Ground truth").is_dir()


def load_sd900(root: Path, split: str = "test") -> SegDataset:
    """SD-Saliency-900 layout: ``Source Images/*.bmp``, ``Ground truth/*.png``, ``split.json``."""
    img_dir, gt_dir = root / "Source Images", root / "Ground truth"
    names = sorted(p.stem for p in _images_in(img_dir))
    class_names: Dict[str, str] = {"In": "inclusion", "Pa": "patches", "Sc": "scratches"}
    split_file = root / "split.json"
    if split != "all":
        if not split_file.is_file():
            raise EdgekitError(f"{root} has no split.json; use --split all or add one")
        try:
            spec = json.loads(split_file.read_text())
            names = list(spec[split])
            class_names.update(spec.get("classes", {}))
        except (ValueError, KeyError):
            raise EdgekitError(f"{split_file}: unreadable or has no {split!r} list") from None
    samples = []
    for n in names:
        ip = next((img_dir / f"{n}{e}" for e in (".bmp", ".png", ".jpg") if (img_dir / f"{n}{e}").exists()), None)
        if ip is None:
            raise EdgekitError(f"{img_dir}: image {n!r} listed in split.json is missing")
        mp = gt_dir / f"{n}.png"
        prefix = _prefix_class(n)
        samples.append(SegSample(n, class_names.get(prefix, prefix), ip, mp if mp.exists() else None))
    if not samples:
        raise EdgekitError(f"no images in {img_dir}")
    classes = sorted({s.cls for s in samples})
    return SegDataset(samples, classes, f"SD-Saliency-900 {split} split ({len(samples)} images) at {root}",
                      name="SD-Saliency-900", split=split)


MASK_SUFFIXES = ("_mask", "_gt", "_label")


def split_masks_beside_images(paths: Sequence[Path]) -> Tuple[List[Path], Dict[str, Path]]:
    """One folder holding images and their masks side by side (the Magnetic-tile layout: ``x.jpg`` +
    ``x.png``; or ``x.jpg`` + ``x_mask.png``): the images, and each image stem's mask. A ``.png``
    that shares its stem with an image of another extension is that image's mask, and so is
    ``STEM_mask.*`` (also ``_gt``, ``_label``) where ``STEM`` is an image; neither counts as an image."""
    by_stem: Dict[str, List[Path]] = defaultdict(list)
    for p in paths:
        by_stem[p.stem].append(p)
    masks: Dict[str, Path] = {}
    for stem, group in by_stem.items():
        pngs = [p for p in group if p.suffix.lower() == ".png"]
        others = [p for p in group if p.suffix.lower() != ".png"]
        if pngs and others:
            masks[stem] = pngs[0]
    for stem in list(by_stem):
        for suffix in MASK_SUFFIXES:
            base = stem[:-len(suffix)] if stem.endswith(suffix) else None
            if base and base in by_stem and base not in masks and stem not in masks:
                masks[base] = by_stem[stem][0]
    mask_files = set(masks.values())
    images = [p for p in paths if p not in mask_files]
    return images, masks


def _class_folders_note(root: Path) -> Optional[str]:
    """The one-line explanation for a class-per-folder set (NEU-CLS) given where masks are needed."""
    try:
        subs = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return None
    with_images = [(p.name, len(_images_in(p))) for p in subs]
    with_images = [(n, k) for n, k in with_images if k]
    if not with_images:
        return None
    names = ", ".join(n for n, _ in with_images[:4]) + (", ..." if len(with_images) > 4 else "")
    total = sum(k for _, k in with_images)
    return (f"{root} holds class folders ({names}: {total} images) but no masks; segmentation needs masks "
            "(images/ + masks/ by file name, or x.png / x_mask.png beside x.jpg); for classification data "
            "use `edgekit adapt`")


def load_pairs(images: Path, masks: Optional[Path]) -> SegDataset:
    """Generic layout: an image folder and a mask folder whose files share stems, or one folder with
    each mask beside its image (``split_masks_beside_images``)."""
    paths = _images_in(images)
    if not paths:
        note = _class_folders_note(images)
        raise EdgekitError(note or f"no images in {images}")
    if masks:
        mask_by_stem = {p.stem: p for p in _images_in(masks)}
    else:
        paths, mask_by_stem = split_masks_beside_images(paths)
    samples = [SegSample(p.stem, _prefix_class(p.stem), p, mask_by_stem.get(p.stem)) for p in paths]
    if masks and not any(s.mask_path for s in samples):
        raise EdgekitError(f"no mask in {masks} matches an image name in {images}")
    classes = sorted({s.cls for s in samples})
    return SegDataset(samples, classes, f"image/mask folders {images} ({len(samples)} images)",
                      name=f"image/mask folders {images}", split="all")


HELD_OUT = {"val": 0.15, "test": 0.15}  # split_by_name: the rest trains


def split_by_name(ds: SegDataset, split: str) -> SegDataset:
    """``split`` (train, val or test) of an image/mask folder without ``split.json``, by a hash of each
    file name: the same on every run and machine, whatever the order files are listed in, and stable
    when images are added (an image keeps its part). At least one image each in val and test."""
    import zlib

    if split not in ("train", "val", "test"):
        raise EdgekitError(f"split {split!r}: a folder without split.json splits into train, val and test")
    n = len(ds.samples)
    if n < 3:
        raise EdgekitError(f"{ds.description}: training needs at least 3 images (train, val, test); "
                           f"found {n}")
    ranked = sorted(ds.samples, key=lambda s: (zlib.crc32(s.name.encode()), s.name))
    n_val, n_test = (max(1, int(round(HELD_OUT[k] * n))) for k in ("val", "test"))
    parts = {"val": ranked[:n_val], "test": ranked[n_val:n_val + n_test], "train": ranked[n_val + n_test:]}
    samples = sorted(parts[split], key=lambda s: s.name)
    return SegDataset(samples, sorted({s.cls for s in samples}),
                      f"{ds.name or ds.description} {split} part by name ({len(samples)} of {n} images)",
                      ds.synthetic, name=ds.name, split=split)


def open_segmentation(data: str, split: str = "test") -> SegDataset:
    """Resolve ``--data``: ``synthetic[:N]``, an SD-900 folder, an ``images/``+``masks/`` folder, or a
    plain image folder (no masks: predictions only)."""
    if split not in SPLITS:
        raise EdgekitError(f"unknown split {split!r} (use one of {', '.join(SPLITS)})")
    if data == "synthetic" or data.startswith("synthetic:"):
        n = data.partition(":")[2]
        if n and not n.isdigit():
            raise EdgekitError(f"synthetic data takes a count: synthetic:64, not {data!r}")
        return synthetic_dataset(int(n) if n else 48, split=split)
    root = Path(data)
    if not root.exists():
        raise EdgekitError(f"data folder not found: {root}")
    if not root.is_dir():
        raise EdgekitError(f"--data must be a folder: {root}")
    if is_sd900(root):
        return load_sd900(root, split)
    if (root / "images").is_dir():
        return load_pairs(root / "images", root / "masks" if (root / "masks").is_dir() else None)
    return load_pairs(root, None)


@dataclass
class ClassSample:
    path: Path
    label: int


def load_class_folders(root: str | os.PathLike, classes: Optional[Sequence[str]] = None) -> Tuple[List[ClassSample], List[str]]:
    """Class-per-folder image sets (``root/<class>/*.jpg``, as NEU-CLS): samples and class names."""
    root = Path(root)
    if not root.is_dir():
        raise EdgekitError(f"data folder not found: {root}")
    names = list(classes) if classes else sorted(p.name for p in root.iterdir() if p.is_dir())
    samples = []
    for i, c in enumerate(names):
        folder = root / c
        if not folder.is_dir():
            raise EdgekitError(f"class folder missing: {folder}")
        imgs = _images_in(folder)
        if not imgs:
            raise EdgekitError(f"no images in class folder {folder}")
        samples += [ClassSample(p, i) for p in imgs]
    if not samples:
        raise EdgekitError(f"no class folders with images in {root}")
    return samples, names


def holdout_split(samples: Sequence[ClassSample], test_fraction: float = 0.2, seed: int = 0):
    """Deterministic per-class split into (train, test)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    labels = sorted({s.label for s in samples})
    for lab in labels:
        group = sorted((s for s in samples if s.label == lab), key=lambda s: s.path.name)
        idx = rng.permutation(len(group))
        k = int(round(len(group) * test_fraction))
        test += [group[i] for i in idx[:k]]
        train += [group[i] for i in idx[k:]]
    return train, test


def synthetic_dataset(n: int = 48, split: str = "test", size: Tuple[int, int] = (200, 200)) -> SegDataset:
    """``n`` synthetic samples (``edgekit.data.synthetic``); each split draws from its own seed so
    splits never overlap."""
    from edgekit.data.synthetic import CLASSES, generate

    seed = {"train": 1, "val": 2, "test": 3, "all": 4}[split]
    samples: List[SegSample] = []
    for i in range(n):
        img, mask, cls = generate(i, size, seed)
        samples.append(SegSample(f"syn_{cls}_{i:04d}", cls, _image=img, _mask=mask))
    return SegDataset(samples, list(CLASSES), f"synthetic steel defects ({n} images, {split} seed)", synthetic=True,
                      name="synthetic steel defects", split=f"{split} seed")
