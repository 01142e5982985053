"""An MLFF classifier: a backbone (PyTorch or a compiled artifact) plus a registry's adapter heads.

``load_mlff(registry)`` checks the backbone against the identity the adapter was trained on before
anything runs. On a compiled backbone artifact the heads run in numpy (``edgekit.mlff.heads``): a station
classifies without torch. On the PyTorch backbone they run in PyTorch.
"""
from __future__ import annotations

import os
from typing import List, Optional

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.mlff.heads import head_logits, softmax


class MLFFClassifier:
    """Backbone + adapter: ``predict(images)`` on image paths or grayscale arrays. ``adapter`` is the PyTorch
    ``MLFFAdapter`` or a ``NumpyAdapter``; features and results are numpy either way."""

    def __init__(self, backbone, adapter, meta: dict):
        self.backbone = backbone
        self.adapter = adapter.eval()
        self.meta = meta
        cfg = meta["config"]
        self.setting = cfg["setting"]
        self.tasks = cfg["tasks"]  # [{"task", "classes"}], in order
        self.classes = [c for t in self.tasks for c in t["classes"]]

    def _features(self, images) -> np.ndarray:
        from edgekit.data.images import read_gray

        arrays = [read_gray(im) if isinstance(im, (str, os.PathLike)) else np.asarray(im) for im in images]
        out = []
        for i in range(0, len(arrays), 32):
            f = self.backbone.pooled(self.backbone.preprocess(arrays[i:i + 32]))
            out.append(f.detach().float().cpu().numpy() if hasattr(f, "detach") else np.asarray(f, np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.backbone.feature_dim), np.float32)

    def predict_features(self, feats, task: Optional[str] = None) -> List[dict]:
        """Predictions for pooled backbone features (a numpy array, or a CPU tensor)."""
        logits = head_logits(self.adapter, feats)
        if self.setting == "class-incremental":
            p = softmax(logits[0])
            return [{"class": self.classes[int(i)], "prob": float(p[n, i])} for n, i in enumerate(p.argmax(axis=1))]
        task_names = [t["task"] for t in self.tasks]
        if task is not None:
            if task not in task_names:
                raise EdgekitError(f"task {task!r} is not in this registry (tasks: {', '.join(task_names)})")
            h = task_names.index(task)
            p = softmax(logits[h])
            return [{"task": task, "class": self.tasks[h]["classes"][int(i)], "prob": float(p[n, i])}
                    for n, i in enumerate(p.argmax(axis=1))]
        # no task given: the head with the most confident answer
        probs = [softmax(lg) for lg in logits]
        out = []
        for n in range(len(probs[0]) if probs else 0):
            h = max(range(len(probs)), key=lambda k: float(probs[k][n].max()))
            i = int(probs[h][n].argmax())
            out.append({"task": self.tasks[h]["task"], "class": self.tasks[h]["classes"][i],
                        "prob": float(probs[h][n, i])})
        return out

    def predict(self, images, task: Optional[str] = None) -> List[dict]:
        return self.predict_features(self._features(images), task)


def load_mlff(registry: str | os.PathLike, task: Optional[str] = None, verify_backbone: bool = True,
              backbone_artifact: Optional[str | os.PathLike] = None, threads: Optional[int] = None) -> MLFFClassifier:
    """Backbone + the newest adapter of a registry (or the adapter saved when ``task`` was added).

    ``backbone_artifact``: run the backbone from a compiled ``mlff-backbone`` artifact folder instead of
    PyTorch; refused when it was not compiled from the backbone the adapter was trained on.
    """
    from edgekit.mlff.registry import Registry

    reg = Registry.open(registry)
    folder = reg.adapter_folder(task)
    if backbone_artifact is not None:  # a station: the compiled backbone and the heads in numpy, no torch
        from edgekit.mlff.adapter import load_adapter_arrays
        from edgekit.mlff.heads import NumpyAdapter
        from edgekit.mlff.runner import CompiledBackbone, check_backbone_match, read_backbone_manifest

        arrays, meta = load_adapter_arrays(folder)
        check_backbone_match(read_backbone_manifest(backbone_artifact), meta, f"registry {reg.folder}", backbone_artifact)
        return MLFFClassifier(CompiledBackbone(backbone_artifact, threads=threads), NumpyAdapter(arrays, meta["config"]),
                              meta)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise EdgekitError("running the MLFF backbone in PyTorch needs torch, which is not installed: pip install "
                           "'edgekit[build]', or run a compiled backbone artifact (classify --backbone-artifact DIR)") \
            from None
    from edgekit.mlff.adapter import load_adapter
    from edgekit.models.backbones import load_backbone
    from edgekit.models.mlff import adapter_from_tensors

    tensors, meta = load_adapter(folder)
    backbone = load_backbone(reg.meta["backbone_ref"])
    if backbone.id != meta["backbone"]:
        raise EdgekitError(f"adapter {folder} was trained on backbone {meta['backbone']}, not {backbone.id}")
    if verify_backbone and backbone.weights_sha256 != meta["backbone_sha256"]:
        raise EdgekitError(f"backbone weights {backbone.weights_path} changed since adapter {folder} was trained "
                           "(sha256 differs); retrain the adapters")
    return MLFFClassifier(backbone, adapter_from_tensors(tensors, meta["config"]), meta)
