"""Training losses: BCE + SSIM (+ optional Dice) per head, summed over the deep-supervision heads.

The network's heads already output sigmoid probabilities, so the losses take probabilities, not
logits. They are computed in float32 (outside autocast: ``binary_cross_entropy`` on half-precision
probabilities is refused by autocast, and SSIM's variance terms need the precision).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

SSIM_C1 = 0.01 ** 2  # (K1 * L)^2 with data range L = 1
SSIM_C2 = 0.03 ** 2


@lru_cache(maxsize=8)
def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).float()


def gaussian_window(size: int = 11, sigma: float = 1.5, channels: int = 1, device=None) -> torch.Tensor:
    """A normalised 2-D Gaussian window ``channels x 1 x size x size`` (for a grouped conv)."""
    g = _gaussian_1d(int(size), float(sigma))
    w = torch.outer(g, g)
    return w.expand(channels, 1, size, size).contiguous().to(device)


def _blur(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Zero-padded Gaussian filtering of every channel, as two 1-D passes (identical to the 2-D
    window ``outer(g, g)`` with zero padding, at 2k instead of k^2 multiply-adds per pixel)."""
    c, k = t.shape[1], g.numel()
    pad = k // 2
    t = F.conv2d(t, g.view(1, 1, 1, k).expand(c, 1, 1, k), padding=(0, pad), groups=c)
    return F.conv2d(t, g.view(1, 1, k, 1).expand(c, 1, k, 1), padding=(pad, 0), groups=c)


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity of two ``N x C x H x W`` maps in [0, 1] (Wang et al. 2004).

    Local statistics come from an ``window_size`` x ``window_size`` Gaussian window (sigma 1.5 by
    default), zero-padded to keep the size, as in the SSIM loss of BASNet-style saliency training.
    """
    c = x.shape[1]
    g = _gaussian_1d(int(window_size), float(sigma)).to(device=x.device, dtype=x.dtype)
    # One filtering pass over the five maps stacked along the channels.
    stats = _blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), g)
    mu_x, mu_y, e_xx, e_yy, e_xy = torch.split(stats, c, dim=1)
    mu_x2, mu_y2, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov = e_xx - mu_x2, e_yy - mu_y2, e_xy - mu_xy
    num = (2 * mu_xy + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_x2 + mu_y2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return (num / den).mean()


def ssim_reference(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The same SSIM with the full 2-D window (slower; kept to test the separable version)."""
    c = x.shape[1]
    w = gaussian_window(window_size, sigma, c, x.device).to(x.dtype)
    pad = window_size // 2
    mu_x = F.conv2d(x, w, padding=pad, groups=c)
    mu_y = F.conv2d(y, w, padding=pad, groups=c)
    mu_x2, mu_y2, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = F.conv2d(x * x, w, padding=pad, groups=c) - mu_x2
    var_y = F.conv2d(y * y, w, padding=pad, groups=c) - mu_y2
    cov = F.conv2d(x * y, w, padding=pad, groups=c) - mu_xy
    num = (2 * mu_xy + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_x2 + mu_y2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return (num / den).mean()


def ssim_loss(prob: torch.Tensor, target: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    return 1.0 - ssim(prob, target, window_size, sigma)


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, per image, averaged over the batch."""
    p, t = prob.flatten(1), target.flatten(1)
    inter = (p * t).sum(1)
    return (1.0 - (2 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def ssim_per_channel(p: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM of each channel of ``p`` (``N x K x H x W``, e.g. the K heads) against the single-channel
    target ``y`` (``N x 1 x H x W``): a vector of K means. Equals ``ssim(p[:, k:k+1], y)`` for each k,
    with the target's statistics filtered once instead of K times."""
    k = p.shape[1]
    g = _gaussian_1d(int(window_size), float(sigma)).to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        mu_y, e_yy = torch.split(_blur(torch.cat([y, y * y], dim=1), g), 1, dim=1)
    mu_x, e_xx, e_xy = torch.split(_blur(torch.cat([p, p * p, p * y], dim=1), g), k, dim=1)
    mu_x2, mu_y2, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov = e_xx - mu_x2, e_yy - mu_y2, e_xy - mu_xy
    num = (2 * mu_xy + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_x2 + mu_y2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return (num / den).mean(dim=(0, 2, 3))


class DeepSupervisionLoss:
    """``sum_h w_h * (bce_w * BCE + ssim_w * (1 - SSIM) [+ dice_w * Dice])`` over the heads.

    The heads are stacked and their losses computed together (one filtering pass for all SSIMs);
    the result equals the sum of ``head_loss`` over the heads.
    """

    def __init__(self, bce: float = 1.0, ssim: float = 1.0, dice: bool = False, dice_weight: float = 1.0,
                 head_weights: Sequence[float] = (1, 1, 1, 1, 1), ssim_window: int = 11, ssim_sigma: float = 1.5):
        self.bce_w, self.ssim_w = float(bce), float(ssim)
        self.dice_w = float(dice_weight) if dice else 0.0
        self.head_weights = [float(w) for w in head_weights]
        self.window, self.sigma = int(ssim_window), float(ssim_sigma)

    def head_loss(self, prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of one head (the reference the stacked computation is tested against)."""
        prob = prob.float()
        loss = prob.new_zeros(())
        if self.bce_w:
            loss = loss + self.bce_w * F.binary_cross_entropy(prob, target)
        if self.ssim_w:
            loss = loss + self.ssim_w * ssim_loss(prob, target, self.window, self.sigma)
        if self.dice_w:
            loss = loss + self.dice_w * dice_loss(prob, target)
        return loss

    def per_head(self, outputs, target: torch.Tensor) -> torch.Tensor:
        """The K heads' losses (unweighted), as a vector."""
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        p = torch.cat([o.float() for o in outputs], dim=1)  # N x K x H x W
        k = p.shape[1]
        loss = p.new_zeros(k)
        if self.bce_w:
            bce = F.binary_cross_entropy(p, target.expand_as(p), reduction="none").mean(dim=(0, 2, 3))
            loss = loss + self.bce_w * bce
        if self.ssim_w:
            loss = loss + self.ssim_w * (1.0 - ssim_per_channel(p, target, self.window, self.sigma))
        if self.dice_w:
            inter = (p * target).sum(dim=(2, 3))
            d = 1.0 - (2 * inter + 1.0) / (p.sum(dim=(2, 3)) + target.sum(dim=(2, 3)) + 1.0)
            loss = loss + self.dice_w * d.mean(dim=0)
        return loss

    def __call__(self, outputs, target: torch.Tensor) -> torch.Tensor:
        n = 1 if isinstance(outputs, torch.Tensor) else len(outputs)
        if n > len(self.head_weights):
            raise ValueError(f"{n} heads but {len(self.head_weights)} head weights")
        w = torch.tensor(self.head_weights[:n], dtype=torch.float32, device=target.device)
        return (w * self.per_head(outputs, target.float())).sum()
