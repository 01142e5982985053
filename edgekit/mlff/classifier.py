"""An MLFF classifier: a backbone (PyTorch or a compiled artifact) plus a registry's adapter heads.

``load_mlff(registry)`` checks the backbone against the identity the adapter was trained on before
anything runs.
"""
from __future__ import annotations

import os
from typing import List, Optional

import numpy as np
import torch

from edgekit.errors import EdgekitError
from edgekit.models.mlff import MLFFAdapter, adapter_from_tensors


class MLFFClassifier:
    """Backbone + adapter: ``predict(images)`` on image paths or grayscale arrays."""

    def __init__(self, backbone, adapter: MLFFAdapter, meta: dict):
        self.backbone = backbone
        self.adapter = adapter.eval()
        self.meta = meta
        cfg = meta["config"]
        self.setting = cfg["setting"]
        self.tasks = cfg["tasks"]  # [{"task", "classes"}], in order
        self.classes = [c for t in self.tasks for c in t["classes"]]

    def _features(self, images) -> torch.Tensor:
        from edgekit.data.images import read_gray

        arrays = [read_gray(im) if isinstance(im, (str, os.PathLike)) else np.asarray(im) for im in images]
        out = []
        for i in range(0, len(arrays), 32):
            out.append(self.backbone.pooled(self.backbone.preprocess(arrays[i:i + 32])))
        return torch.cat(out) if out else torch.zeros(0, self.backbone.feature_dim)

    @torch.no_grad()
    def predict_features(self, feats: torch.Tensor, task: Optional[str] = None) -> List[dict]:
        if self.setting == "class-incremental":
            p = torch.softmax(self.adapter(feats, 0), dim=1)
            conf, idx = p.max(dim=1)
            names = self.classes
            return [{"class": names[int(i)], "prob": float(c)} for c, i in zip(conf, idx)]
        task_names = [t["task"] for t in self.tasks]
        if task is not None:
            if task not in task_names:
                raise EdgekitError(f"task {task!r} is not in this registry (tasks: {', '.join(task_names)})")
            h = task_names.index(task)
            p = torch.softmax(self.adapter(feats, h), dim=1)
            conf, idx = p.max(dim=1)
            return [{"task": task, "class": self.tasks[h]["classes"][int(i)], "prob": float(c)} for c, i in zip(conf, idx)]
        # no task given: the head with the most confident answer
        z = self.adapter.embed(feats)
        best = []
        for h, t in enumerate(self.tasks):
            p = torch.softmax(self.adapter.heads[h](z), dim=1)
            best.append(p.max(dim=1))
        out = []
        for n in range(feats.shape[0]):
            h = max(range(len(best)), key=lambda k: float(best[k][0][n]))
            out.append({"task": self.tasks[h]["task"], "class": self.tasks[h]["classes"][int(best[h][1][n])],
                        "prob": float(best[h][0][n])})
        return out

    def predict(self, images, task: Optional[str] = None) -> List[dict]:
        return self.predict_features(self._features(images), task)


def load_mlff(registry: str | os.PathLike, task: Optional[str] = None, verify_backbone: bool = True,
              backbone_artifact: Optional[str | os.PathLike] = None, threads: Optional[int] = None) -> MLFFClassifier:
    """Backbone + the newest adapter of a registry (or the adapter saved when ``task`` was added).

    ``backbone_artifact``: run the backbone from a compiled ``mlff-backbone`` artifact folder instead of
    PyTorch; refused when it was not compiled from the backbone the adapter was trained on.
    """
    from edgekit.models.backbones import load_backbone
    from edgekit.mlff.adapter import load_adapter
    from edgekit.mlff.registry import Registry

    reg = Registry.open(registry)
    folder = reg.adapter_folder(task)
    tensors, meta = load_adapter(folder)
    if backbone_artifact is not None:
        from edgekit.mlff.runner import CompiledBackbone, check_backbone_match, read_backbone_manifest

        check_backbone_match(read_backbone_manifest(backbone_artifact), meta, f"registry {reg.folder}", backbone_artifact)
        return MLFFClassifier(CompiledBackbone(backbone_artifact, threads=threads),
                              adapter_from_tensors(tensors, meta["config"]), meta)
    backbone = load_backbone(reg.meta["backbone_ref"])
    if backbone.id != meta["backbone"]:
        raise EdgekitError(f"adapter {folder} was trained on backbone {meta['backbone']}, not {backbone.id}")
    if verify_backbone and backbone.weights_sha256 != meta["backbone_sha256"]:
        raise EdgekitError(f"backbone weights {backbone.weights_path} changed since adapter {folder} was trained "
                           "(sha256 differs); retrain the adapters")
    return MLFFClassifier(backbone, adapter_from_tensors(tensors, meta["config"]), meta)
