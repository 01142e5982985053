"""Compiling the frozen MLFF backbone: the ``mlff-backbone`` source kind of ``compile_model``.

What is compiled is exactly the frozen part: preprocessed image -> every tap -> pooled (max for shallow
taps, average for deep ones) -> concatenated ``N x feature_dim``, the vector the adapters consume. The
adapters (a few hundred KB, updated over the air) stay outside the artifact.

Manifest fields of such an artifact (besides the common ones of ``edgekit.artifact``)::

    model: {kind: "mlff-backbone", backbone, backbone_sha256, ref, tap_names, tap_dims, pools,
            feature_dim, input_spec}
    output: {name: "features", shape: [batch, feature_dim]}
    source: {path, sha256 (= backbone_sha256), registry (when compiled from one)}
    parity: {max_abs_diff, mean_abs_diff (features), top1_agreement / accuracy of the registry's adapter}

``backbone`` / ``backbone_sha256`` are the identity adapters and registries carry (see
``edgekit.mlff.runner.check_backbone_match``).

Image sets (``--parity-data``, ``--calib``, ``--val``): a folder of class folders (``DIR/<class>/*``, as
NEU-CLS; split with the fixed ``holdout_split(0.2, seed 0)``: calibration from the train part, parity and
validation on the held-out test part, the part ``benchmarks/mlff_neu.py`` and ``edgekit bench`` test on),
a plain image folder, or ``synthetic[:N]``.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from edgekit.data.preprocess import PreprocessSpec
from edgekit.errors import EdgekitError
from edgekit.pipeline.onnx_export import INPUT_NAME
from edgekit.progress import track
from edgekit.mlff.runner import MLFF_KIND, TorchBackboneRunner, backbone_preprocess_dict

FEATURES_NAME = "features"
HOLDOUT = (0.2, 0)  # test fraction, seed: the fixed held-out part of class-folder data


class PooledBackbone(torch.nn.Module):
    """The frozen part as one module: image batch -> pooled, concatenated tap features."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone.pool(self.backbone.taps(x))


def _static_pad_forward(conv, pads, x):
    import torch.nn.functional as F

    if any(pads):
        x = F.pad(x, pads)
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


@contextlib.contextmanager
def static_same_padding(model: torch.nn.Module, input_shape):
    """TF-'SAME' convolutions with their padding fixed for ``input_shape`` while the model is exported.

    ``SameConv2d`` computes its padding from the input's size at run time; traced, that becomes a
    Shape/Gather/Div/Pad subgraph per convolution, which onnxsim folds wrongly (measured: EfficientNet-Lite0
    features off by up to 48 after simplification, 2e-5 before). With the padding constant, the Pad ops
    are plain constants (folded into the convolutions). The model is unchanged afterwards.
    """
    from edgekit.models.backbones import SameConv2d

    convs = [m for m in model.modules() if isinstance(m, SameConv2d)]
    sizes = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp: sizes.__setitem__(mod, tuple(inp[0].shape[-2:])))
             for m in convs]
    try:
        if convs:
            with torch.no_grad():
                model(torch.zeros(*input_shape))
    finally:
        for h in hooks:
            h.remove()
    patched = []
    try:
        for m in convs:
            if m not in sizes:
                continue
            (ih, iw), (kh, kw), (sh, sw), (dh, dw) = sizes[m], m.weight.shape[-2:], m.stride, m.dilation
            ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
            pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
            pads = [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]
            m.forward = (lambda x, m=m, pads=pads: _static_pad_forward(m, pads, x))
            patched.append(m)
        yield model
    finally:
        for m in patched:
            del m.forward


@dataclass
class ImageSet:
    """Grayscale images with an optional class name each (``None``: unlabelled)."""
    description: str
    items: list  # paths or arrays
    labels: List[Optional[str]] = field(default_factory=list)
    synthetic: bool = False

    def __len__(self):
        return len(self.items)

    def arrays(self, idx) -> List[np.ndarray]:
        from edgekit.data.images import read_gray

        return [read_gray(self.items[i]) if isinstance(self.items[i], (str, os.PathLike)) else self.items[i] for i in idx]

    def spread(self, limit: Optional[int]) -> List[int]:
        """Up to ``limit`` indices spread evenly over the set (every class, when sorted by class)."""
        n = len(self.items)
        if limit is None or limit >= n:
            return list(range(n))
        return sorted({int(i) for i in np.linspace(0, n - 1, limit)})


def open_images(data: str, part: str = "test") -> ImageSet:
    """``part``: ``train`` / ``test`` (the fixed held-out part of class folders) or ``all``."""
    if data == "synthetic" or str(data).startswith("synthetic:"):
        from edgekit.data.datasets import open_segmentation

        ds = open_segmentation(data, "all")
        return ImageSet(ds.description, [s.image() for s in ds.samples], [None] * len(ds.samples), synthetic=True)
    root = Path(data)
    if not root.is_dir():
        raise EdgekitError(f"image folder not found: {root}")
    if any(p.is_dir() for p in root.iterdir()):
        from edgekit.data.datasets import holdout_split, load_class_folders

        samples, names = load_class_folders(root)
        if part != "all":
            train, test = holdout_split(samples, *HOLDOUT)
            samples = train if part == "train" else test
        return ImageSet(f"{root} ({part} part, holdout_split{HOLDOUT})" if part != "all" else str(root),
                        [s.path for s in samples], [names[s.label] for s in samples])
    from edgekit.data.images import expand_image_paths

    files = expand_image_paths([root])
    if not files:
        raise EdgekitError(f"no images in {root}")
    return ImageSet(str(root), files, [None] * len(files))


class BackboneSource:
    """``compile_model``'s source when the model is an MLFF backbone (by name, file, or a registry's)."""

    kind = MLFF_KIND
    checkpoint = None
    manifest = None

    def __init__(self, backbone, registry=None):
        self.backbone = backbone
        self.registry = registry
        self.path = Path(registry.folder if registry is not None else backbone.ref)
        self.spec = PreprocessSpec.from_dict(backbone_preprocess_dict(backbone.input_spec))
        c, h, w = backbone.input_spec["shape"]
        self.base = {
            "model": {"kind": MLFF_KIND, "backbone": backbone.id, "backbone_sha256": backbone.weights_sha256,
                      "ref": backbone.ref, "tap_names": backbone.tap_names, "tap_dims": backbone.tap_dims,
                      "pools": backbone.pools, "feature_dim": backbone.feature_dim, "input_spec": backbone.input_spec},
            "input": {"name": INPUT_NAME, "shape": ["batch", c, h, w], "dtype": "float32", "layout": "NCHW"},
            "output": {"name": FEATURES_NAME, "shape": ["batch", backbone.feature_dim],
                       "meaning": "pooled tap features (taps " + ", ".join(
                           f"{n}:{d}:{p}" for n, d, p in zip(backbone.tap_names, backbone.tap_dims, backbone.pools))
                       + "), the input of the MLFF adapters"},
            "preprocess": backbone_preprocess_dict(backbone.input_spec),
            "source": {"path": str(backbone.ref), "sha256": backbone.weights_sha256,
                       **({"registry": str(registry.folder)} if registry is not None else {})},
        }

    @classmethod
    def open(cls, ref: str) -> "BackboneSource":
        from edgekit.models.backbones import load_backbone
        from edgekit.mlff.registry import REGISTRY_NAME, Registry

        p = Path(ref)
        if p.is_dir() and (p / REGISTRY_NAME).is_file():
            reg = Registry.open(p)
            bb = load_backbone(reg.meta["backbone_ref"])
            if bb.id != reg.meta["backbone"] or bb.weights_sha256 != reg.meta["backbone_sha256"]:
                raise EdgekitError(f"registry {p}: its backbone {reg.meta['backbone_ref']} changed since the adapters "
                                   "were trained (id or sha256 differs); retrain the adapters")
            return cls(bb, reg if reg.tasks else None)
        return cls(load_backbone(ref))

    # -- what compile_model asks of a source ------------------------------------------------------------
    def model_file(self, tmp: Path) -> Path:
        from edgekit.pipeline.onnx_export import export_onnx

        shape = (1, *self.backbone.input_spec["shape"])
        with static_same_padding(PooledBackbone(self.backbone), shape) as model:
            return export_onnx(model, shape, tmp / "export.onnx", output_name=FEATURES_NAME)

    def reference_runner(self, threads=None) -> TorchBackboneRunner:
        return TorchBackboneRunner(self.backbone, threads=threads)

    def preprocess(self, images) -> np.ndarray:
        return self.backbone.preprocess(images).numpy()

    def parity_data(self, data: str) -> ImageSet:
        return open_images(data, "test")

    def calibration_data(self, calib: str) -> ImageSet:
        return open_images("synthetic:128" if calib == "synthetic" else calib, "train")

    def validation_data(self, val: str) -> ImageSet:
        return open_images(val, "test")

    @property
    def artifact_target(self):
        return None  # always compiled from the backbone itself

    def torch_module(self):
        return PooledBackbone(self.backbone)

    def check_batches(self, images: ImageSet, limit: int = 16) -> List[np.ndarray]:
        return [self.preprocess(images.arrays([i])) for i in images.spread(limit)]

    def nncf_validation(self, dataset, metric: str, model_format: str):
        return None, None  # the budget is checked after quantization (int8_check), not inside NNCF

    def summary(self, out: str, manifest: dict) -> str:
        p = manifest["parity"]
        agree = (f", adapter top-1 agreement {p['top1_agreement']:.4f}" if "top1_agreement" in p else "") + \
                (f", accuracy {p['accuracy_reference']:.4f} -> {p['accuracy']:.4f}" if "accuracy" in p else "")
        return (f"wrote {out}: MLFF backbone {self.backbone.id}, {manifest['target']} {manifest['precision']}, features "
                f"vs {p['reference']}: max |diff| {p['max_abs_diff']:.2e}{agree} on {p['images']} images")

    def calibration_batches(self, images: ImageSet, limit: int) -> List[np.ndarray]:
        idx = images.spread(limit)
        if not idx:
            raise EdgekitError(f"{images.description}: no calibration images")
        return [self.preprocess(images.arrays([i])) for i in track(idx, len(idx), "INT8: reading the calibration images")]

    def adapter(self):
        """(adapter, meta) of the registry's newest adapter, or None when compiled from a bare backbone."""
        if self.registry is None:
            return None
        from edgekit.mlff.classifier import MLFFClassifier
        from edgekit.models.mlff import adapter_from_tensors
        from edgekit.mlff.adapter import load_adapter

        tensors, meta = load_adapter(self.registry.adapter_folder())
        return MLFFClassifier(None, adapter_from_tensors(tensors, meta["config"]), meta)

    def parity(self, candidate, images: ImageSet, threads=None, limit: int = 48) -> dict:
        """Feature max/mean |diff| vs the PyTorch backbone, and the registry adapter's top-1 agreement (and
        accuracy, on labelled images of classes it knows) on both feature sets."""
        reference = self.reference_runner(threads)
        idx = images.spread(limit)
        fa, fb = [], []
        what = f"parity: {getattr(candidate, 'name', 'artifact')} vs the PyTorch backbone"
        for s in track(range(0, len(idx), 8), len(idx), what, count=lambda s: len(idx[s:s + 8])):
            x = self.preprocess(images.arrays(idx[s:s + 8]))
            fa.append(reference.infer(x))
            fb.append(np.concatenate([candidate.infer(x[i:i + 1]) for i in range(len(x))]))
        a, b = np.concatenate(fa).astype(np.float64), np.concatenate(fb).astype(np.float64)
        for side, arr, runner in (("reference", a, reference), ("candidate", b, candidate)):
            if not np.isfinite(arr).all():  # fail closed: NaN compares false with every budget
                raise EdgekitError(f"parity: the {side} ({runner.describe()}) gives non-finite features "
                                   f"({int((~np.isfinite(arr)).sum()):,} of {arr.size:,} values); nothing written")
        d = np.abs(a - b)
        out = {"images": len(idx), "data": images.description, "reference": reference.describe(),
               "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
               "max_rel_diff": float(d.max() / max(np.abs(a).max(), 1e-12))}
        clf = self.adapter()
        if clf is not None:
            out.update(_agreement(clf, torch.from_numpy(a).float(), torch.from_numpy(b).float(),
                                  [images.labels[i] for i in idx]))
            out["adapter"] = str(self.registry.adapter_folder())
        return out

    def int8_check(self, candidate, val: ImageSet, max_drop: Optional[float], threads=None, metric: str = "top1",
                   log=print) -> dict:
        """Top-1 accuracy of the registry adapter on ``val`` before (PyTorch) and after (INT8 artifact)."""
        r = self.parity(candidate, val, threads, limit=None)
        if "accuracy_reference" not in r:
            raise EdgekitError(f"--val {val.description}: needs labelled images (class folders) of classes the "
                               "registry knows, and a registry to compile from")
        before, after = r["accuracy_reference"], r["accuracy"]
        drop = before - after
        info = {"metric": "top1_accuracy", "validation": val.description, "validation_images": r["labelled_images"],
                "before": before, "after": after, "drop": drop, "max_drop": max_drop,
                "top1_agreement": r["top1_agreement"]}
        if max_drop is not None and drop > max_drop:  # the refusal is the one line (with the figures), no note before it
            raise EdgekitError(f"INT8 top-1 accuracy on {val.description} drops by {drop:.4f} ({before:.4f} -> "
                               f"{after:.4f}), over --max-drop {max_drop}; nothing written")
        log(f"INT8 top-1 accuracy on {val.description}: {before:.4f} -> {after:.4f} (drop {drop:+.4f})")
        return info


def _agreement(clf, fa: torch.Tensor, fb: torch.Tensor, labels) -> dict:
    pa, pb = clf.predict_features(fa), clf.predict_features(fb)
    key = (lambda p: (p.get("task"), p["class"]))
    out = {"top1_agreement": float(np.mean([key(x) == key(y) for x, y in zip(pa, pb)]))}
    known = [i for i, lab in enumerate(labels) if lab is not None and lab in clf.classes]
    if known:
        out["labelled_images"] = len(known)
        out["accuracy_reference"] = float(np.mean([pa[i]["class"] == labels[i] for i in known]))
        out["accuracy"] = float(np.mean([pb[i]["class"] == labels[i] for i in known]))
    return out


def is_mlff_source(path: str, as_backbone: bool = False) -> bool:
    """Compile ``path`` as an MLFF backbone? A registry folder, a backbone name, or any ref with the flag."""
    from edgekit.models.backbones import BACKBONE_NAMES
    from edgekit.mlff.registry import REGISTRY_NAME

    p = Path(path)
    return as_backbone or path in BACKBONE_NAMES or (p.is_dir() and (p / REGISTRY_NAME).is_file())
