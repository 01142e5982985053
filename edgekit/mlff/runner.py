"""Runners for MLFF models: the frozen backbone (PyTorch or a compiled ``mlff-backbone`` artifact) and
backbone + adapter heads.

A compiled MLFF backbone artifact (``edgekit compile REGISTRY|BACKBONE --target ...``) takes the
preprocessed image batch and returns the pooled tap features ``N x feature_dim``, the exact vectors an
MLFF adapter reads; the adapter (tiny) runs in numpy on top of it (``edgekit.mlff.heads``), so a
station runs a compiled backbone and its adapters without torch. Its manifest names the backbone it was compiled
from (``model.backbone`` and ``model.backbone_sha256``, the same id and sha256 an adapter's
``backbone`` / ``backbone_sha256`` fields carry), so a registry is checked against it before anything runs
(``check_backbone_match``).

* ``TorchBackboneRunner(backbone)``: ``infer(batch) -> N x F`` pooled features, in PyTorch.
* ``CompiledBackbone(folder)``: the ``Backbone`` interface ``load_mlff`` needs (``preprocess``, ``pooled``,
  ``id``, ``weights_sha256``...) on top of the artifact's runner.
* ``MLFFRunner(features, adapter)``: ``infer(batch) -> N x (sum of head sizes)`` logits of every head,
  what ``edgekit bench`` times for an adapter registry (backbone + N heads per image).
* ``load_mlff_runner(registry, backbone_artifact=None)``: that runner for a registry.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from edgekit.data.preprocess import PreprocessSpec, resize_bilinear
from edgekit.errors import EdgekitError
from edgekit.backends.base import Runner

MLFF_KIND = "mlff-backbone"


def backbone_preprocess_dict(input_spec: dict) -> dict:
    """A ``PreprocessSpec``-shaped dict (input size, channels) for a backbone's input spec, so the generic
    artifact runners know the input shape. The preprocessing itself is ``input_spec``'s
    (``edgekit.models.backbones.preprocess_images``)."""
    if input_spec.get("kind") == "edgekit":
        return dict(input_spec["preprocess"])
    c, h, w = input_spec["shape"]
    return {"mean": list(input_spec["mean"]), "std": list(input_spec["std"]), "input_size": [int(h), int(w)],
            "channels": int(c), "scale": str(input_spec.get("scale", "255"))}


def backbone_preprocess(images: Sequence[np.ndarray], input_spec: dict) -> np.ndarray:
    """Grayscale uint8 images -> the ``N x 3 x H x W`` float32 batch a backbone's input spec describes, in numpy:
    the numbers of ``edgekit.models.backbones.preprocess_images`` (PyTorch), without torch."""
    if input_spec.get("kind", "imagenet") == "edgekit":
        from edgekit.data.preprocess import preprocess

        return preprocess(list(images), PreprocessSpec.from_dict(input_spec["preprocess"]))
    c, h, w = (int(v) for v in input_spec["shape"])
    mean = np.asarray(input_spec["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(input_spec["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    out = np.empty((len(images), c, h, w), dtype=np.float32)
    for i, img in enumerate(images):
        x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
        out[i] = resize_bilinear(x, (h, w)) if x.shape != (h, w) else x
    return (out - mean) / std


class TorchBackboneRunner(Runner):
    """The frozen PyTorch backbone: preprocessed batch -> pooled tap features."""

    name = "torch"

    def __init__(self, backbone, threads: Optional[int] = None):
        import torch

        super().__init__(PreprocessSpec.from_dict(backbone_preprocess_dict(backbone.input_spec)),
                         backbone.weights_path, {"backbone": backbone.id, "backbone_sha256": backbone.weights_sha256})
        if threads:
            torch.set_num_threads(int(threads))
        self.backbone = backbone

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.backbone.pooled(torch.from_numpy(self._check_batch(batch))).float().numpy()

    def describe(self) -> str:
        return f"torch fp32 (backbone {self.backbone.id})"


def read_backbone_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of an ``mlff-backbone`` artifact (file hashes verified); a clear error otherwise."""
    from edgekit.artifact import read_manifest

    folder = Path(folder)
    if not folder.exists():
        raise EdgekitError(f"backbone artifact not found: {folder}")
    man = read_manifest(folder)
    kind = man.get("model", {}).get("kind")
    if kind != MLFF_KIND:
        raise EdgekitError(f"{folder} is a {kind!r} artifact, not an MLFF backbone; compile one with "
                           "edgekit compile REGISTRY --target openvino|onnx --out DIR")
    return man


def check_backbone_match(manifest: dict, adapter_meta: dict, where: str, folder) -> None:
    """Refuse (one line) when an adapter was not trained on the backbone an artifact was compiled from.

    Identity is the pair (backbone id, backbone sha256): the sha256 of the backbone's weights file (for a
    GMBINet checkpoint, of the checkpoint file) that ``edgekit adapt`` records in every adapter and in the
    registry. The artifact's own file hashes are a different thing (its integrity, checked on load). The
    feature layout (tap widths, pooling) and the input preprocessing must match too.
    """
    m = manifest["model"]
    want, have = (adapter_meta["backbone"], adapter_meta["backbone_sha256"]), (m["backbone"], m["backbone_sha256"])
    if want != have:
        raise EdgekitError(f"backbone mismatch: {where} was trained on backbone {want[0]} (sha256 {want[1][:16]}…), "
                           f"but artifact {folder} holds {have[0]} (sha256 {have[1][:16]}…)")
    cfg = adapter_meta.get("config", {})
    if list(cfg.get("tap_dims", m["tap_dims"])) != list(m["tap_dims"]) or \
            list(cfg.get("pools", m["pools"])) != list(m["pools"]):
        raise EdgekitError(f"backbone mismatch: {where} reads taps {cfg.get('tap_dims')} pooled {cfg.get('pools')}, "
                           f"artifact {folder} gives {m['tap_dims']} pooled {m['pools']}")
    if "input" in adapter_meta and adapter_meta["input"] != m["input_spec"]:
        raise EdgekitError(f"backbone mismatch: {where} expects another input preprocessing than artifact {folder}")


class CompiledBackbone:
    """A compiled MLFF backbone artifact with the interface of ``edgekit.models.backbones.Backbone``
    that classification needs (``preprocess`` images, ``pooled`` features, identity), in numpy: a station
    runs it without torch (``preprocess`` gives and ``pooled`` takes and gives numpy arrays)."""

    def __init__(self, folder: str | os.PathLike, threads: Optional[int] = None):
        from edgekit import runtime

        self.folder = Path(folder)
        self.manifest = read_backbone_manifest(self.folder)
        self.runner = runtime.load(self.folder, threads=threads)
        m = self.manifest["model"]
        self.id = m["backbone"]
        self.weights_sha256 = m["backbone_sha256"]
        self.tap_names = list(m["tap_names"])
        self.tap_dims = [int(d) for d in m["tap_dims"]]
        self.pools = list(m["pools"])
        self.input_spec = dict(m["input_spec"])
        self.ref = m.get("ref")
        self.weights_path = self.folder

    @property
    def feature_dim(self) -> int:
        return sum(self.tap_dims)

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return backbone_preprocess(images, self.input_spec)

    def pooled(self, x) -> np.ndarray:
        x = x.numpy() if hasattr(x, "numpy") else x  # a torch batch from a caller on the PyTorch side
        return np.asarray(self.runner.infer(np.ascontiguousarray(x, dtype=np.float32)), dtype=np.float32)


class MLFFRunner(Runner):
    """Backbone features (any runner giving ``N x F``) + the adapter: logits of every head, concatenated."""

    def __init__(self, features: Runner, adapter, meta: dict, source=None):
        super().__init__(features.spec, Path(source or features.source), dict(meta))
        self.features = features
        self.adapter = adapter.eval()
        self.name = f"{features.name}+adapter"
        self.precision = features.precision
        self.heads = len(adapter.heads)
        self.input_spec = meta["input"]

    @property
    def input_shape(self):
        return self.features.input_shape

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return backbone_preprocess(images, self.input_spec)

    def logits(self, batch: np.ndarray) -> List[np.ndarray]:
        from edgekit.mlff.heads import head_logits

        return head_logits(self.adapter, np.ascontiguousarray(self.features.infer(batch), dtype=np.float32))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.concatenate(self.logits(batch), axis=1)

    def describe(self) -> str:
        return f"{self.features.describe()} + adapter ({self.heads} head{'s' if self.heads != 1 else ''})"


def load_mlff_runner(registry: str | os.PathLike, backbone_artifact: Optional[str | os.PathLike] = None,
                     threads: Optional[int] = None) -> MLFFRunner:
    """Backbone (PyTorch, or the compiled artifact, checked against the registry) + the newest adapter (in
    PyTorch on the PyTorch backbone, in numpy on a compiled one)."""
    from edgekit.mlff.classifier import load_mlff
    from edgekit.mlff.adapter import load_adapter_arrays
    from edgekit.mlff.heads import NumpyAdapter
    from edgekit.mlff.registry import Registry

    if backbone_artifact is None:
        clf = load_mlff(registry)
        return MLFFRunner(TorchBackboneRunner(clf.backbone, threads=threads), clf.adapter, clf.meta, source=registry)
    reg = Registry.open(registry)
    folder = reg.adapter_folder()
    arrays, meta = load_adapter_arrays(folder)
    man = read_backbone_manifest(backbone_artifact)
    check_backbone_match(man, meta, f"registry {reg.folder}", backbone_artifact)
    from edgekit import runtime

    feats = runtime.load(backbone_artifact, threads=threads)
    return MLFFRunner(feats, NumpyAdapter(arrays, meta["config"]), meta, source=backbone_artifact)
