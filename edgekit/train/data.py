"""Training data: the train split preloaded once as uint8 tensors, and batched augmentation +
preprocessing with torch ops (the same divide-by-max, z-score, bilinear resize and gray->3ch that
``edgekit.data.preprocess.preprocess`` applies at inference)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from edgekit.data.datasets import SegDataset, SegSample
from edgekit.data.preprocess import PreprocessSpec
from edgekit.errors import EdgekitError


def preload(samples: Sequence[SegSample], what: str, desc: str = "loading images",
            show_progress: bool = True) -> List[SegSample]:
    """Samples with their image and mask read into memory (uint8 gray, bool mask); ``desc`` names the
    progress bar."""
    from edgekit.progress import track

    out = []
    for s in track(samples, len(samples), desc, enabled=show_progress):
        img, mask = s.load()
        if mask is None:
            raise EdgekitError(f"{what}: image {s.name} has no ground-truth mask")
        out.append(SegSample(s.name, s.cls, s.image_path, s.mask_path, _image=np.ascontiguousarray(img),
                             _mask=np.ascontiguousarray(mask, dtype=bool)))
    return out


@dataclass
class TrainSet:
    """``images``: N x H x W uint8; ``masks``: N x H x W uint8 (0..255, soft where resized)."""
    images: torch.Tensor
    masks: torch.Tensor
    names: List[str]
    classes: List[str]

    def __len__(self):
        return self.images.shape[0]


def build_trainset(dataset: SegDataset, samples: Sequence[SegSample], input_size: Tuple[int, int],
                   resize: str = "stretch", show_progress: bool = True) -> TrainSet:
    """Stack the images once. Same-size images stay at their own size (resized per batch, like
    inference); mixed sizes are resized to the training input size here (stretch only: a letterboxed
    image's padding must be 0 after normalisation, which the per-batch path gives and this one cannot)."""
    loaded = preload(samples, dataset.description, desc="train: loading the train images", show_progress=show_progress)
    if not loaded:
        raise EdgekitError(f"{dataset.description}: no training images")
    shapes = {s._image.shape for s in loaded}
    if len(shapes) > 1 and resize == "letterbox":
        sizes = ", ".join(f"{w}x{h}" for h, w in sorted(shapes)[:3]) + (", ..." if len(shapes) > 3 else "")
        raise EdgekitError(f"{dataset.description}: letterbox training needs images of one size ({len(shapes)} sizes: "
                           f"{sizes}); resize them to one size first, or train with --resize stretch")
    imgs, masks = [], []
    for s in loaded:
        img = torch.from_numpy(np.array(s._image, dtype=np.uint8))
        m = torch.from_numpy(s._mask.astype(np.uint8) * 255)
        if len(shapes) > 1:
            img = _resize_u8(img, input_size)
            m = _resize_u8(m, input_size)
        imgs.append(img)
        masks.append(m)
    return TrainSet(torch.stack(imgs), torch.stack(masks), [s.name for s in loaded], [s.cls for s in loaded])


def _resize_u8(t: torch.Tensor, size) -> torch.Tensor:
    x = F.interpolate(t.float()[None, None], size=tuple(size), mode="bilinear", align_corners=False)
    return x[0, 0].round().clamp(0, 255).to(torch.uint8)


class EpochSampler:
    """Batch indices as a pure function of (seed, iteration): shuffled epochs without replacement,
    batches running across epoch boundaries. Resuming at iteration k draws exactly what an
    uninterrupted run would have drawn."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self._perms: Dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0x5EED))
            self._perms = {epoch: torch.randperm(self.n, generator=g)}  # keep only the current epoch
        return self._perms[epoch]

    def indices(self, iteration: int) -> torch.Tensor:
        start = iteration * self.batch
        idx = []
        for q in range(start, start + self.batch):
            idx.append(int(self._perm(q // self.n)[q % self.n]))
        return torch.tensor(idx, dtype=torch.long)


def _mix(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def batch_generator(seed: int, iteration: int) -> torch.Generator:
    """The augmentation RNG of one iteration (a pure function of seed and iteration)."""
    return torch.Generator().manual_seed(_mix(seed, iteration, 0xA06))


def augment(images: torch.Tensor, masks: torch.Tensor, cfg, gen: torch.Generator):
    """Flips and intensity shift/scaling of raw gray images (``B x H x W``, 0..255).

    Returns float images (0..255, clamped) and float masks (0..1). The intensity scaling is about
    each image's mean, so the divide-by-max that follows does not cancel it (a plain gain would be).
    """
    u = torch.rand(images.shape[0], 4, generator=gen).to(images.device)  # drawn on the CPU: the same on any device
    return augment_with(images, masks, cfg, u)


def augment_with(images: torch.Tensor, masks: torch.Tensor, cfg, u: torch.Tensor):
    """:func:`augment` with its uniform draws given: ``u`` is ``B x 4`` in [0, 1) (hflip, vflip, scale,
    shift). The host pipeline draws them on the CPU, the device-resident one on the device; the
    arithmetic, hence the distributions, are these lines for both."""
    x = images.float()
    y = masks.float() / 255.0
    hf = (u[:, 0] < cfg.hflip)[:, None, None]
    vf = (u[:, 1] < cfg.vflip)[:, None, None]
    x = torch.where(hf, x.flip(-1), x)
    y = torch.where(hf, y.flip(-1), y)
    x = torch.where(vf, x.flip(-2), x)
    y = torch.where(vf, y.flip(-2), y)
    if cfg.scale:
        factor = (1.0 + (2 * u[:, 2] - 1) * cfg.scale)[:, None, None]
        mean = x.mean(dim=(1, 2), keepdim=True)
        x = mean + factor * (x - mean)
    if cfg.shift:
        x = x + ((2 * u[:, 3] - 1) * cfg.shift * 255.0)[:, None, None]
    return x.clamp_(0.0, 255.0), y


def normalize(x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """Float gray ``B x H x W`` (0..255) -> ``B x C x h x w`` network input, as ``preprocess`` does:
    divide by the image's own maximum (or 255), z-score (one mean/std, or one per channel after the
    channel is replicated: an ImageNet-style spec), then stretched or letterboxed to ``input_size``
    (letterbox: the padding is 0 after normalisation, i.e. the mean, as at inference)."""
    if spec.scale == "max":
        m = x.amax(dim=(1, 2), keepdim=True)
        x = torch.where(m > 0, x / torch.where(m > 0, m, torch.ones_like(m)), x)
    else:
        x = x / 255.0
    x = x[:, None]
    if isinstance(spec.mean, list) or isinstance(spec.std, list):
        # per channel: used to fail (a list subtracted from a tensor) where preprocess handled it
        c = spec.channels
        mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1).expand(1, c, 1, 1)
        std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1).expand(1, c, 1, 1)
        x = (x.expand(-1, c, -1, -1) - mean) / std
    else:
        x = (x - spec.mean) / spec.std
    x = _place(x, spec.input_size, spec.resize)
    return x.expand(-1, spec.channels, -1, -1).contiguous()


def _place(x: torch.Tensor, size, resize: str = "stretch") -> torch.Tensor:
    """``B x C x H x W`` -> ``B x C x h x w``: stretched (bilinear), or letterboxed (scaled to fit, aspect
    ratio kept, centred, padded with 0) as ``edgekit.data.preprocess`` places an image."""
    from edgekit.data.preprocess import letterbox_box

    size = tuple(size)
    if resize == "letterbox":
        top, left, nh, nw = letterbox_box(tuple(x.shape[-2:]), size)
        if tuple(x.shape[-2:]) != (nh, nw):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        return F.pad(x, (left, size[1] - nw - left, top, size[0] - nh - top))
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


def resize_masks(y: torch.Tensor, size, resize: str = "stretch") -> torch.Tensor:
    """Float masks ``B x H x W`` -> ``B x 1 x h x w`` targets (bilinear, soft at the edges), placed as
    the images are (``resize``: stretch or letterbox, whose padding is background)."""
    return _place(y[:, None], size, resize).clamp_(0, 1)


def make_batch(ts: TrainSet, idx: torch.Tensor, aug_cfg, spec: PreprocessSpec, gen: torch.Generator):
    """One augmented, preprocessed batch, computed on the device the TrainSet's tensors are on."""
    idx = idx.to(ts.images.device)
    x, y = augment(ts.images[idx], ts.masks[idx], aug_cfg, gen)
    x, y = normalize(x, spec), resize_masks(y, spec.input_size, spec.resize)
    crop = getattr(aug_cfg, "crop", None)
    if crop:
        x, y = random_crop(x, y, crop, gen)
    return x, y


def random_crop(x: torch.Tensor, y: torch.Tensor, size, gen: torch.Generator):
    """The same random ``size`` window of each image and its mask (a window per sample). Cropping
    after the whole-image divide-by-max and resize keeps the inference preprocessing and object scale."""
    h, w = x.shape[-2:]
    ch, cw = size
    u = torch.rand(x.shape[0], 2, generator=gen)
    tops = (u[:, 0] * (h - ch + 1)).long().clamp_(max=h - ch).tolist()
    lefts = (u[:, 1] * (w - cw + 1)).long().clamp_(max=w - cw).tolist()
    xs = [x[i, :, t:t + ch, l:l + cw] for i, (t, l) in enumerate(zip(tops, lefts))]
    ys = [y[i, :, t:t + ch, l:l + cw] for i, (t, l) in enumerate(zip(tops, lefts))]
    return torch.stack(xs).contiguous(), torch.stack(ys).contiguous()
