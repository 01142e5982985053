"""Model summary for ``edgekit info``: parameters and multiply-accumulates, counted by our own hooks.

We report MACs of convolutions and linear layers (one multiply-accumulate per kernel tap per output
element), the convention of ``thop`` and of most papers' "FLOPs" figures, including the GMBINet
paper's 0.39 G. FLOPs are reported as 2 x MACs. Element-wise work (BN, ReLU, sigmoid, the EWMS
multiply-adds, resizes) is counted separately as element-wise operations.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn

_ELEMENTWISE = (nn.BatchNorm2d, nn.ReLU, nn.Sigmoid)


def count_macs(model: nn.Module, input_shape: Tuple[int, ...]) -> Dict[str, int]:
    """Run one forward pass on zeros of ``input_shape`` (N x C x H x W) and count per layer type."""
    counts = {"conv_macs": 0, "linear_macs": 0, "elementwise_ops": 0}

    def conv_hook(m: nn.Conv2d, inp, out):
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        counts["conv_macs"] += out.numel() * k

    def linear_hook(m: nn.Linear, inp, out):
        counts["linear_macs"] += out.numel() * m.in_features

    def ew_hook(m, inp, out):
        counts["elementwise_ops"] += out.numel()

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, _ELEMENTWISE):
            handles.append(m.register_forward_hook(ew_hook))
    try:
        with torch.no_grad():
            # On the model's device: a meta-device model counts without allocating activations.
            device = next(model.parameters()).device
            model(torch.zeros(input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    counts["macs"] = counts["conv_macs"] + counts["linear_macs"]
    counts["flops"] = 2 * counts["macs"]
    return counts
