"""GMBINet (arXiv 2508.16397): a 0.19 M-parameter encoder-decoder for surface-defect segmentation.

Module names follow the authors' published checkpoint (``encoder1..5``, ``decoder5``, ``DF1..4``,
``conv_out1..5``; GMBI blocks hold ``conv0..3`` and ``fusion``) so that its ``state_dict`` loads
natively with every key matched.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekit.errors import EdgekitError
from edgekit.models.registry import register_model


# Sane bounds for a checkpoint's architecture (inclusive). The published model is widths
# 16..128, depths 3..6, 4 groups, 0.2 M parameters; these leave >30x headroom for wider or deeper
# variants while keeping the largest model a config can ask for at a few hundred MB.
LIMITS = {"in_channels": (1, 64), "width": (1, 2048), "depth": (0, 32), "scales": (1, 64), "out_channels": (1, 256)}


def _bounded_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value != int(value):
        raise EdgekitError(f"GMBINet config: {name} must be an integer, not {value!r}")
    if not lo <= int(value) <= hi:
        raise EdgekitError(f"GMBINet config: {name} {int(value)} is outside [{lo}, {hi}]")
    return int(value)


def _bounded_ints(name: str, values, n: int, lo: int, hi: int) -> tuple:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise EdgekitError(f"GMBINet config needs {n} {name}, not {values!r}"[:200])
    return tuple(_bounded_int(f"{name}[{i}]", v, lo, hi) for i, v in enumerate(values))


@dataclass
class GMBINetConfig:
    in_channels: int = 3
    widths: Tuple[int, ...] = (16, 32, 64, 96, 128)  # stage 1..5 output channels
    depths: Tuple[int, ...] = (3, 4, 6, 3)  # GMBI modules after the down block of stages 2..5
    scales: int = 4  # n: channel groups per GMBI module, group i uses dilation i+1
    out_channels: int = 1
    dropout: float = 0.1
    # The published model also defines decoder1-4 and conv_final, which its forward never calls.
    # They are kept only so the authors' state_dict loads with every key matched.
    upstream_extras: bool = False
    # Channels of DF1's output (the main head's input). None: widths[0], as published. Pruning
    # can shrink it on its own: nothing else adds to it.
    head_width: Optional[int] = None

    def __post_init__(self):
        # Bounds first, before any module is sized from these numbers: a checkpoint's config is
        # untrusted input, and widths of 65,536 or depths of 10^6 would otherwise allocate tens of GB.
        self.in_channels = _bounded_int("in_channels", self.in_channels, *LIMITS["in_channels"])
        self.widths = _bounded_ints("widths", self.widths, 5, *LIMITS["width"])
        self.depths = _bounded_ints("depths", self.depths, 4, *LIMITS["depth"])
        self.scales = _bounded_int("scales", self.scales, *LIMITS["scales"])
        self.out_channels = _bounded_int("out_channels", self.out_channels, *LIMITS["out_channels"])
        if self.head_width is not None:
            self.head_width = _bounded_int("head_width", self.head_width, *LIMITS["width"])
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) \
                or not 0.0 <= float(self.dropout) < 1.0:
            raise EdgekitError(f"GMBINet config: dropout must be a number in [0, 1), not {self.dropout!r}")
        if not isinstance(self.upstream_extras, bool):
            raise EdgekitError(f"GMBINet config: upstream_extras must be true or false, not {self.upstream_extras!r}")
        for w in self.widths[1:]:
            if w % self.scales:
                raise EdgekitError(
                    f"GMBINet config: stage width {w} is not divisible by the {self.scales} GMBI groups")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["depths"] = list(self.depths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GMBINetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise EdgekitError(f"GMBINet config has unknown keys: {', '.join(sorted(map(str, unknown)))}"[:300])
        return cls(**d)


def _conv_bn_relu(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, dilation: int = 1):
    pad = dilation * (k // 2)
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups, dilation=dilation),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class GMBI(nn.Module):
    """Group Multi-scale Bidirectional Interaction module.

    Channels are split into ``n`` equal groups; group ``i`` runs a depthwise 3x3 conv with dilation
    ``i+1``. Forward guidance feeds ``sigmoid(y_i) * x_{i+1} + x_{i+1}`` into group ``i+1``; backward
    enhancement then sets ``y_i' = sigmoid(y_{i+1}) * y_i + y_i`` for ``i < n-1``. The groups are
    concatenated, fused by a 1x1 conv + BN + ReLU, and the input is added back.
    """

    def __init__(self, channels: int, scales: int = 4):
        super().__init__()
        if channels % scales:
            raise EdgekitError(f"GMBI: {channels} channels do not split into {scales} equal groups")
        self.scales = scales
        g = channels // scales
        for i in range(scales):
            setattr(self, f"conv{i}", nn.Sequential(*_conv_bn_relu(g, g, 3, groups=g, dilation=i + 1)))
        self.fusion = nn.Sequential(*_conv_bn_relu(channels, channels, 1))

    @property
    def group_convs(self) -> List[nn.Sequential]:
        return [getattr(self, f"conv{i}") for i in range(self.scales)]

    def split_sizes(self) -> List[int]:
        # Read from the weights, not fixed at construction, so a pruned module keeps working.
        return [conv[0].out_channels for conv in self.group_convs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = torch.split(x, self.split_sizes(), dim=1)
        ys = []
        for i, conv in enumerate(self.group_convs):
            xi = xs[i]
            if i > 0:
                xi = torch.sigmoid(ys[-1]) * xi + xi
            ys.append(conv(xi))
        outs = [torch.sigmoid(ys[i + 1]) * ys[i] + ys[i] for i in range(self.scales - 1)]
        outs.append(ys[-1])
        return self.fusion(torch.cat(outs, dim=1)) + x


class DownBlock(nn.Module):
    """Depthwise-separable stride-2 block: DW 3x3 s2 + BN + ReLU, PW 1x1 + BN + ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(*_conv_bn_relu(cin, cin, 3, stride=2, groups=cin), *_conv_bn_relu(cin, cout, 1))

    def forward(self, x):
        return self.conv(x)


class ConvBlock(nn.Module):
    """1x1 conv + BN + ReLU channel adapter."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(*_conv_bn_relu(cin, cout, 1))

    def forward(self, x):
        return self.conv(x)


class DecoderFusion(nn.Module):
    """Fuses a skip feature with the upsampled deeper feature: DW 3x3 + PW 1x1 on (low + high)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(*_conv_bn_relu(cin, cin, 3, groups=cin), *_conv_bn_relu(cin, cout, 1))

    def forward(self, low, high):
        return self.conv(low + high)


def _head(cin: int, cout: int, p: float, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Dropout2d(p=p), nn.Conv2d(cin, cout, k, padding=k // 2), nn.Sigmoid())


class GMBINet(nn.Module):
    """GMBINet. In training mode ``forward`` returns the five deep-supervision heads (main head
    first), each upsampled to the input size; in eval mode it computes only the main head."""

    def __init__(self, config: GMBINetConfig | None = None):
        super().__init__()
        self.config = cfg = config or GMBINetConfig()
        w, d = cfg.widths, cfg.depths
        self.encoder1 = nn.Sequential(*_conv_bn_relu(cfg.in_channels, w[0], 3, stride=2))
        for s in range(1, 5):
            blocks = [DownBlock(w[s - 1], w[s])] + [GMBI(w[s], cfg.scales) for _ in range(d[s - 1])]
            setattr(self, f"encoder{s + 1}", nn.Sequential(*blocks))
        self.decoder5 = ConvBlock(w[4], w[3])
        self.DF4 = DecoderFusion(w[3], w[2])
        self.DF3 = DecoderFusion(w[2], w[1])
        self.DF2 = DecoderFusion(w[1], w[0])
        hw = cfg.head_width or w[0]
        self.DF1 = DecoderFusion(w[0], hw)
        head_in = (hw, w[0], w[1], w[2], w[3])  # conv_out1..5
        for i, c in enumerate(head_in, start=1):
            setattr(self, f"conv_out{i}", _head(c, cfg.out_channels, cfg.dropout))
        if cfg.upstream_extras:
            self.decoder4 = ConvBlock(w[3], w[2])
            self.decoder3 = ConvBlock(w[2], w[1])
            self.decoder2 = ConvBlock(w[1], w[0])
            self.decoder1 = ConvBlock(w[0], w[0])
            self.conv_final = _head(cfg.out_channels * 5, cfg.out_channels, cfg.dropout, k=3)
        self.all_heads: bool | None = None  # None: all heads while training, main head in eval

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        all_heads = self.training if self.all_heads is None else self.all_heads
        e1 = self.encoder1(x)
        e2 = self.encoder2(e1)
        e3 = self.encoder3(e2)
        e4 = self.encoder4(e3)
        e5 = self.encoder5(e4)
        d5 = self.decoder5(e5)
        d4 = self.DF4(e4, _up(d5, e4))
        d3 = self.DF3(e3, _up(d4, e3))
        d2 = self.DF2(e2, _up(d3, e2))
        d1 = self.DF1(e1, _up(d2, e1))
        main = _up(self.conv_out1(d1), x)
        if not all_heads:
            return main
        sides = [self.conv_out2(d2), self.conv_out3(d3), self.conv_out4(d4), self.conv_out5(d5)]
        return [main] + [_up(s, x) for s in sides]

    def encoder_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Outputs of stages 2-5 (strides 4, 8, 16, 32): the taps an MLFF adapter reads."""
        e = self.encoder1(x)
        feats = []
        for s in range(2, 6):
            e = getattr(self, f"encoder{s}")(e)
            feats.append(e)
        return feats

    def inference_parameter_count(self) -> int:
        """Parameters the eval-mode forward uses: no side heads, no unused upstream modules."""
        training_only = {"conv_out2", "conv_out3", "conv_out4", "conv_out5",
                         "decoder4", "decoder3", "decoder2", "decoder1", "conv_final"}
        return sum(p.numel() for n, p in self.named_parameters() if n.split(".")[0] not in training_only)

    def gmbi_modules(self) -> List[GMBI]:
        return [m for m in self.modules() if isinstance(m, GMBI)]


def _up(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Nearest-neighbour resize to the reference's spatial size, as in the published model.
    return F.interpolate(t, size=like.shape[-2:], mode="nearest")


@register_model("gmbinet")
def build_gmbinet(**config) -> GMBINet:
    return GMBINet(GMBINetConfig.from_dict(config) if config else GMBINetConfig())


def config_from_state_dict(sd: dict) -> GMBINetConfig:
    """Infer the architecture of a GMBINet ``state_dict`` from its tensor shapes.

    Works for the published checkpoint and any width/depth/scale variant saved with the same names.
    """
    try:
        w0 = sd["encoder1.0.weight"].shape
        widths = [int(w0[0])]
        depths = []
        scales = None
        for s in range(2, 6):
            widths.append(int(sd[f"encoder{s}.0.conv.3.weight"].shape[0]))
            n = 0
            while f"encoder{s}.{n + 1}.fusion.0.weight" in sd:
                n += 1
            depths.append(n)
            if n and scales is None:
                scales = 0
                while f"encoder{s}.1.conv{scales}.0.weight" in sd:
                    scales += 1
        out_ch = int(sd["conv_out1.1.weight"].shape[0])
        head_width = int(sd["DF1.conv.3.weight"].shape[0])
    except KeyError as e:
        raise EdgekitError(f"not a GMBINet state_dict: key {e.args[0]!r} is missing") from None
    except (IndexError, AttributeError):
        raise EdgekitError("not a GMBINet state_dict: a convolution weight is not 4-dimensional") from None
    return GMBINetConfig(
        in_channels=int(w0[1]), widths=tuple(widths), depths=tuple(depths), scales=scales or 4,
        out_channels=out_ch, upstream_extras="conv_final.1.weight" in sd,
        head_width=None if head_width == widths[0] else head_width)
