"""Runners for MLFF models: the frozen backbone (PyTorch or a compiled ``mlff-backbone`` artifact) and
backbone + adapter heads.

A compiled MLFF backbone artifact (``edgekit compile REGISTRY|BACKBONE --target ...``) takes the
preprocessed image batch and returns the pooled tap features ``N x feature_dim``, the exact vectors an
MLFF adapter reads; the adapter (tiny) stays in PyTorch. Its manifest names the backbone it was compiled
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
import torch

from edgekit.data.preprocess import PreprocessSpec
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


class TorchBackboneRunner(Runner):
    """The frozen PyTorch backbone: preprocessed batch -> pooled tap features."""

    name = "torch"

    def __init__(self, backbone, threads: Optional[int] = None):
        super().__init__(PreprocessSpec.from_dict(backbone_preprocess_dict(backbone.input_spec)),
                         backbone.weights_path, {"backbone": backbone.id, "backbone_sha256": backbone.weights_sha256})
        if threads:
            torch.set_num_threads(int(threads))
        self.backbone = backbone

    @torch.inference_mode()
    def infer(self, batch: np.ndarray) -> np.ndarray:
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
    that classification needs (``preprocess`` images, ``pooled`` features, identity)."""

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

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        from edgekit.models.backbones import preprocess_images

        return preprocess_images(images, self.input_spec)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.runner.infer(x.numpy()))


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
        from edgekit.models.backbones import preprocess_images

        return preprocess_images(images, self.input_spec).numpy()

    @torch.inference_mode()
    def logits(self, batch: np.ndarray) -> List[torch.Tensor]:
        z = self.adapter.embed(torch.from_numpy(np.ascontiguousarray(self.features.infer(batch))))
        return [h(z) for h in self.adapter.heads]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return torch.cat(self.logits(batch), dim=1).numpy()

    def describe(self) -> str:
        return f"{self.features.describe()} + adapter ({self.heads} head{'s' if self.heads != 1 else ''})"


def load_mlff_runner(registry: str | os.PathLike, backbone_artifact: Optional[str | os.PathLike] = None,
                     threads: Optional[int] = None) -> MLFFRunner:
    """Backbone (PyTorch, or the compiled artifact, checked against the registry) + the newest adapter."""
    from edgekit.mlff.classifier import load_mlff
    from edgekit.models.mlff import adapter_from_tensors
    from edgekit.mlff.adapter import load_adapter
    from edgekit.mlff.registry import Registry

    if backbone_artifact is None:
        clf = load_mlff(registry)
        return MLFFRunner(TorchBackboneRunner(clf.backbone, threads=threads), clf.adapter, clf.meta, source=registry)
    reg = Registry.open(registry)
    folder = reg.adapter_folder()
    tensors, meta = load_adapter(folder)
    man = read_backbone_manifest(backbone_artifact)
    check_backbone_match(man, meta, f"registry {reg.folder}", backbone_artifact)
    from edgekit import runtime

    feats = runtime.load(backbone_artifact, threads=threads)
    return MLFFRunner(feats, adapter_from_tensors(tensors, meta["config"]), meta, source=backbone_artifact)
