"""Folding a PyTorch GMBINet for edgekit's own kernels (build side: needs torch): every BatchNorm of
an eval-mode model folded into its conv in float64 (:func:`fold_gmbinet`, :func:`fold_gmbi`), laid out
as the kernels read them (:class:`edgekit.kernels.graph.FoldedGMBINet`), and the float64 reference of
one GMBI module the fused kernels are tested against (:func:`reference_gmbi`).

A device never imports this module: a compiled artifact carries the folded parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekit.errors import EdgekitError
from edgekit.kernels.graph import FoldedGMBINet, FoldedLayer

# ----------------------------------------------------------------------------------------------
# BN folding and the float64 reference


@dataclass
class GMBIParams:
    """A GMBI module with BatchNorm folded in (float64, CPU).

    ``dw_weight[k]`` is the 3x3 kernel (row-major, 9 taps) of channel ``k`` of the concatenated
    groups (group ``i`` owns channels ``i*G .. i*G+G-1`` and uses dilation ``i+1``);
    ``pw_weight`` is the 1x1 fusion conv as ``[C_out, C_in]``.
    """

    channels: int
    scales: int
    dw_weight: torch.Tensor  # [C, 9]
    dw_bias: torch.Tensor  # [C]
    pw_weight: torch.Tensor  # [C_out, C_in]
    pw_bias: torch.Tensor  # [C]

    @property
    def group_channels(self) -> int:
        return self.channels // self.scales

    def kernel_arrays(self) -> Dict[str, np.ndarray]:
        """fp32, C-contiguous arrays in the order and layout the kernel takes them."""
        f32 = lambda t: np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))  # noqa: E731
        return {
            "dw_w": f32(self.dw_weight.reshape(self.channels, 9)),
            "dw_b": f32(self.dw_bias),
            "pw_wt": f32(self.pw_weight.t()),  # [C_in][C_out]: a float4 is 4 consecutive outputs
            "pw_b": f32(self.pw_bias),
        }


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding conv, in float64: returns (weight, bias)."""
    if bn.running_mean is None or bn.running_var is None:
        raise EdgekitError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    w = conv.weight.detach().to(torch.float64)
    b = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    mean = bn.running_mean.detach().to(torch.float64)
    var = bn.running_var.detach().to(torch.float64)
    gamma = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return w * scale.view(-1, *([1] * (w.dim() - 1))), (b - mean) * scale + beta


def _conv_bn_relu_parts(seq: nn.Module, where: str) -> Tuple[nn.Conv2d, nn.BatchNorm2d]:
    parts = list(seq.children()) if isinstance(seq, nn.Sequential) else []
    if (len(parts) != 3 or not isinstance(parts[0], nn.Conv2d) or not isinstance(parts[1], nn.BatchNorm2d)
            or not isinstance(parts[2], nn.ReLU)):
        raise EdgekitError(f"GMBI fold: {where} is not Conv2d + BatchNorm2d + ReLU")
    return parts[0], parts[1]


def fold_gmbi(module: nn.Module) -> GMBIParams:
    """Fold the BatchNorms of a ``edgekit.models.gmbinet.GMBI`` module (eval semantics: running
    statistics) into its convs.  Works on CPU; the result is float64."""
    convs = getattr(module, "group_convs", None)
    fusion = getattr(module, "fusion", None)
    if convs is None or fusion is None:
        raise EdgekitError(f"fold_gmbi expects a GMBI module, got {type(module).__name__}")
    scales = len(convs)
    dw_w, dw_b = [], []
    g = None
    for i, seq in enumerate(convs):
        conv, bn = _conv_bn_relu_parts(seq, f"conv{i}")
        gi = conv.out_channels
        if g is None:
            g = gi
        if (gi != g or conv.in_channels != gi or conv.groups != gi or tuple(conv.kernel_size) != (3, 3)
                or tuple(conv.dilation) != (i + 1, i + 1) or tuple(conv.padding) != (i + 1, i + 1)
                or tuple(conv.stride) != (1, 1)):
            raise EdgekitError(
                f"GMBI fold: conv{i} must be a depthwise 3x3 conv with dilation {i + 1}, padding {i + 1} and "
                f"{g} channels like conv0")
        w, b = fold_conv_bn(conv, bn)
        dw_w.append(w.reshape(gi, 9))
        dw_b.append(b)
    conv, bn = _conv_bn_relu_parts(fusion, "fusion")
    c = g * scales
    if tuple(conv.kernel_size) != (1, 1) or conv.in_channels != c or conv.out_channels != c or conv.groups != 1:
        raise EdgekitError(f"GMBI fold: fusion must be a dense 1x1 conv {c} -> {c}")
    pw_w, pw_b = fold_conv_bn(conv, bn)
    return GMBIParams(channels=c, scales=scales, dw_weight=torch.cat(dw_w), dw_bias=torch.cat(dw_b),
                      pw_weight=pw_w.reshape(c, c), pw_bias=pw_b)


def reference_gmbi(x: torch.Tensor, params: GMBIParams) -> torch.Tensor:
    """The GMBI forward pass from folded parameters, in float64 (CPU or GPU, NCHW).

    This is the definition the fused kernel is checked against."""
    if x.dim() != 4 or x.shape[1] != params.channels:
        raise EdgekitError(f"reference_gmbi: expected [N, {params.channels}, H, W], got {tuple(x.shape)}")
    x = x.to(torch.float64)
    dev = x.device
    g, n = params.group_channels, params.scales
    dw_w = params.dw_weight.to(dev, torch.float64).reshape(-1, 1, 3, 3)
    dw_b = params.dw_bias.to(dev, torch.float64)
    xs = torch.split(x, g, dim=1)
    ys = []
    for i in range(n):
        xi = xs[i]
        if i > 0:
            xi = torch.sigmoid(ys[-1]) * xi + xi
        sl = slice(i * g, (i + 1) * g)
        ys.append(F.relu(F.conv2d(xi, dw_w[sl], dw_b[sl], padding=i + 1, dilation=i + 1, groups=g)))
    zs = [torch.sigmoid(ys[i + 1]) * ys[i] + ys[i] for i in range(n - 1)] + [ys[-1]]
    pw_w = params.pw_weight.to(dev, torch.float64)
    fused = F.conv2d(torch.cat(zs, dim=1), pw_w.reshape(*pw_w.shape, 1, 1), params.pw_bias.to(dev, torch.float64))
    return F.relu(fused) + x


def _f32(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))


def _seq_parts(seq: nn.Module, n_convs: int, where: str) -> List[Tuple[nn.Conv2d, nn.BatchNorm2d]]:
    parts = list(seq.children()) if isinstance(seq, nn.Sequential) else []
    out = []
    for i in range(n_convs):
        trio = parts[3 * i:3 * i + 3]
        if (len(trio) != 3 or not isinstance(trio[0], nn.Conv2d) or not isinstance(trio[1], nn.BatchNorm2d)
                or not isinstance(trio[2], nn.ReLU)):
            raise EdgekitError(f"GMBINet fold: {where} is not {n_convs} x (Conv2d + BatchNorm2d + ReLU)")
        out.append((trio[0], trio[1]))
    if len(parts) != 3 * n_convs:
        raise EdgekitError(f"GMBINet fold: {where} has {len(parts)} modules, expected {3 * n_convs}")
    return out


def _check_conv(conv: nn.Conv2d, where: str, *, k: int, stride: int, groups: int, cin: int, cout: int):
    if (tuple(conv.kernel_size) != (k, k) or tuple(conv.stride) != (stride, stride) or conv.groups != groups
            or conv.in_channels != cin or conv.out_channels != cout or tuple(conv.dilation) != (1, 1)
            or tuple(conv.padding) != (k // 2, k // 2)):
        raise EdgekitError(f"GMBINet fold: {where} is not a {k}x{k} stride-{stride} conv {cin}->{cout} "
                           f"(groups {groups}, padding {k // 2})")


def _fold_dw(conv, bn, where, c, stride):
    _check_conv(conv, where, k=3, stride=stride, groups=c, cin=c, cout=c)
    w, b = fold_conv_bn(conv, bn)
    return {"dw_w": _f32(w.reshape(c, 9)), "dw_b": _f32(b)}


def _fold_pw(conv, bn, where, cin, cout):
    _check_conv(conv, where, k=1, stride=1, groups=1, cin=cin, cout=cout)
    w, b = fold_conv_bn(conv, bn)
    return {"pw_wt": _f32(w.reshape(cout, cin).t()), "pw_b": _f32(b)}


def fold_gmbinet(model: nn.Module, channel_multiple: int = 4) -> FoldedGMBINet:
    """Fold every BatchNorm of an eval-mode ``GMBINet`` (running statistics) into its conv, in
    float64, and lay the parameters out as the kernels read them (fp32).

    ``channel_multiple``: what every stage width and the head width must be a multiple of for the
    target's kernels (the CUDA kernels' float4 loads over output channels: 4, the default; the CPU
    kernels take any count: 1). The GMBI stage widths are multiples of 4 whatever it is: the model's
    4 equal channel groups need that (``GMBINetConfig`` refuses anything else)."""
    from edgekit.models.gmbinet import GMBINet

    if not isinstance(model, GMBINet):
        raise EdgekitError(f"fold_gmbinet expects a GMBINet, got {type(model).__name__}")
    cfg = model.config
    w, d = tuple(cfg.widths), tuple(cfg.depths)
    if cfg.scales != 4:
        raise EdgekitError(f"the fused GMBI kernel is written for 4 groups, this GMBINet has scales={cfg.scales}")
    hw = int(getattr(cfg, "head_width", None) or w[0])
    if any(c % 4 for c in w[1:]):
        raise EdgekitError(f"GMBINet fold: the GMBI stage widths {list(w[1:])} do not split into 4 equal groups")
    if channel_multiple > 1 and any(c % channel_multiple for c in (*w, hw)):
        raise EdgekitError(f"the GMBINet kernels need stage widths (and the head width) divisible by {channel_multiple}, "
                           f"got {list(w)} (head {hw})")
    net = FoldedGMBINet(in_channels=cfg.in_channels, widths=w, depths=d, out_channels=cfg.out_channels,
                        head_width=hw)

    (conv, bn), = _seq_parts(model.encoder1, 1, "encoder1")
    _check_conv(conv, "encoder1", k=3, stride=2, groups=1, cin=cfg.in_channels, cout=w[0])
    sw, sb = fold_conv_bn(conv, bn)  # [w0, cin, 3, 3] -> [cin*9][w0]: a float4 is 4 consecutive outputs
    net.layers["stem"] = FoldedLayer("stem", "stem", cfg.in_channels, w[0],
                                     {"w": _f32(sw.permute(1, 2, 3, 0).reshape(cfg.in_channels * 9, w[0])),
                                      "b": _f32(sb)})
    for s in range(2, 6):
        enc = getattr(model, f"encoder{s}")
        blocks = list(enc.children())
        if len(blocks) != 1 + d[s - 2]:
            raise EdgekitError(f"GMBINet fold: encoder{s} has {len(blocks)} blocks, expected {1 + d[s - 2]}")
        (c1, b1), (c2, b2) = _seq_parts(blocks[0].conv, 2, f"encoder{s}.0")
        arrays = {**_fold_dw(c1, b1, f"encoder{s}.0 depthwise", w[s - 2], 2),
                  **_fold_pw(c2, b2, f"encoder{s}.0 pointwise", w[s - 2], w[s - 1])}
        net.layers[f"down{s}"] = FoldedLayer(f"down{s}", "s2", w[s - 2], w[s - 1], arrays)
        for i, blk in enumerate(blocks[1:], start=1):
            p = fold_gmbi(blk)
            if p.channels != w[s - 1] or p.scales != 4:
                raise EdgekitError(f"GMBINet fold: encoder{s}.{i} has {p.channels} channels, expected {w[s - 1]}")
            name = f"gmbi{s}_{i}"
            net.gmbi[name] = p
            net.layers[name] = FoldedLayer(name, "gmbi", p.channels, p.channels, p.kernel_arrays())
    (conv, bn), = _seq_parts(model.decoder5.conv, 1, "decoder5")
    net.layers["decoder5"] = FoldedLayer("decoder5", "pw", w[4], w[3], _fold_pw(conv, bn, "decoder5", w[4], w[3]))
    for name, cin, cout in (("DF4", w[3], w[2]), ("DF3", w[2], w[1]), ("DF2", w[1], w[0]), ("DF1", w[0], hw)):
        (c1, b1), (c2, b2) = _seq_parts(getattr(model, name).conv, 2, name)
        arrays = {**_fold_dw(c1, b1, f"{name} depthwise", cin, 1), **_fold_pw(c2, b2, f"{name} pointwise", cin, cout)}
        net.layers[name] = FoldedLayer(name, "up", cin, cout, arrays)
    head = [m for m in model.conv_out1.children() if isinstance(m, nn.Conv2d)]
    if len(head) != 1:
        raise EdgekitError("GMBINet fold: conv_out1 has no single Conv2d")
    hc = head[0]
    _check_conv(hc, "conv_out1", k=1, stride=1, groups=1, cin=hw, cout=cfg.out_channels)
    hb = hc.bias if hc.bias is not None else hc.weight.new_zeros(cfg.out_channels)
    net.layers["head"] = FoldedLayer("head", "head", hw, cfg.out_channels,
                                     {"w": _f32(hc.weight.reshape(cfg.out_channels, hw)), "b": _f32(hb)})
    return net


__all__ = ["GMBIParams", "fold_conv_bn", "fold_gmbi", "fold_gmbinet", "reference_gmbi"]
