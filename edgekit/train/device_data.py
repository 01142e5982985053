"""GPU-resident training data (``train.device_data: true``): the decoded training split lives on the
training device and every batch is drawn, augmented and preprocessed there without a round trip to
the host.

What differs from the host pipeline (``edgekit.train.data.make_batch`` fed by ``EpochSampler``):

* the epoch permutations and the augmentation draws come from generators *on the device*, one per
  iteration seeded from (seed, iteration) as the host pipeline's are, so a run is still a pure function
  of its seed and a resumed run draws what an uninterrupted one would (on the same device);
* the random crop is one gather (per-sample row/column indices) instead of per-sample slices read
  back as Python integers, so nothing in a step waits for the device;
* the arithmetic of flips, intensity scaling and shift, divide-by-max, z-score and resize is the host
  pipeline's own (``augment_with``, ``normalize``, ``resize_masks``): the distributions are the same,
  and tests/test_train_device.py compares statistics of many samples of both on the CPU.

The same code runs on the CPU (tests, ``--budget`` smoke runs): only the device differs.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from edgekit.data.preprocess import PreprocessSpec
from edgekit.train.data import TrainSet, _mix, augment_with, normalize, resize_masks

_PERM_SALT, _AUG_SALT = 0xD5EED, 0xDA06


class DeviceBatches:
    """Batches of ``ts`` as (x, y) on ``device``: ``batch(iteration)``."""

    def __init__(self, ts: TrainSet, batch: int, seed: int, aug_cfg, spec: PreprocessSpec, device: torch.device):
        self.device = torch.device(device)
        self.images = ts.images.to(self.device)
        self.masks = ts.masks.to(self.device)
        self.n, self.batch_size, self.seed = len(ts), int(batch), int(seed)
        self.aug, self.spec = aug_cfg, spec
        self._perms: Dict[int, torch.Tensor] = {}
        self._offsets = torch.arange(self.batch_size, device=self.device)

    def __len__(self) -> int:
        return self.n

    def _generator(self, *parts: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(_mix(self.seed, *parts))

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            perm = torch.randperm(self.n, generator=self._generator(epoch, _PERM_SALT), device=self.device)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # at most two epochs kept
            self._perms[epoch] = perm
        return self._perms[epoch]

    def indices(self, iteration: int) -> torch.Tensor:
        """Shuffled epochs without replacement, batches running across epoch boundaries (as EpochSampler)."""
        start = iteration * self.batch_size
        first, last = start // self.n, (start + self.batch_size - 1) // self.n
        perms = torch.cat([self._perm(e) for e in range(first, last + 1)])
        return perms[start - first * self.n + self._offsets]

    def batch(self, iteration: int) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(iteration)
        gen = self._generator(iteration, _AUG_SALT)
        u = torch.rand(self.batch_size, 4, generator=gen, device=self.device)
        x, y = augment_with(self.images[idx], self.masks[idx], self.aug, u)
        x, y = normalize(x, self.spec), resize_masks(y, self.spec.input_size, self.spec.resize)
        crop = getattr(self.aug, "crop", None)
        if crop:
            x, y = gather_crop(x, y, crop, torch.rand(self.batch_size, 2, generator=gen, device=self.device))
        return x, y


def gather_crop(x: torch.Tensor, y: torch.Tensor, size, u: torch.Tensor):
    """A random ``size`` window per sample, the same for image and mask, as one gather; ``u`` (B x 2 in
    [0, 1)) places it: the top-left corner is uniform over the valid positions, as ``random_crop``'s."""
    h, w = x.shape[-2:]
    ch, cw = size
    tops = (u[:, 0] * (h - ch + 1)).long().clamp_(max=h - ch)
    lefts = (u[:, 1] * (w - cw + 1)).long().clamp_(max=w - cw)
    rows = (tops[:, None] + torch.arange(ch, device=x.device))[:, None, :, None]
    cols = (lefts[:, None] + torch.arange(cw, device=x.device))[:, None, None, :]
    b = torch.arange(x.shape[0], device=x.device)[:, None, None, None]

    def take(t):
        c = torch.arange(t.shape[1], device=t.device)[None, :, None, None]
        return t[b, c, rows, cols].contiguous()

    return take(x), take(y)
