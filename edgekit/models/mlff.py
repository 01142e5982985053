"""MLFF: multi-level feature fusion adapters on a frozen backbone, for continual learning.

The backbone (``edgekit.models.backbones``) gives feature maps at several depths; each is pooled to a
vector (max-pool shallow, average-pool deep). The adapter projects each vector (Linear + BN1d + ReLU
to ``fc_dim // levels``), concatenates, fuses (Linear + BN1d + ReLU to ``fc_dim``) and classifies with
one head (class-incremental: one growing head over all classes) or one head per task
(task-incremental). Only the adapter trains.

``load_mlff(registry)`` gives an ``MLFFClassifier`` that runs backbone + adapter on images.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from edgekit.errors import EdgekitError

SETTINGS = ("class-incremental", "task-incremental")


class MLFFAdapter(nn.Module):
    """Input: the backbone's pooled taps concatenated (``N x sum(tap_dims)``)."""

    def __init__(self, tap_dims: Sequence[int], fc_dim: int = 160, head_sizes: Sequence[int] = ()):
        super().__init__()
        self.tap_dims = [int(d) for d in tap_dims]
        levels = len(self.tap_dims)
        if fc_dim < levels:
            raise EdgekitError(f"fc_dim {fc_dim} is smaller than the {levels} levels")
        self.fc_dim = int(fc_dim)
        per = self.fc_dim // levels
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Linear(d, per), nn.BatchNorm1d(per), nn.ReLU(inplace=True)) for d in self.tap_dims)
        self.fuse = nn.Sequential(nn.Linear(per * levels, self.fc_dim), nn.BatchNorm1d(self.fc_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleList(nn.Linear(self.fc_dim, int(n)) for n in head_sizes)

    @property
    def head_sizes(self) -> List[int]:
        return [h.out_features for h in self.heads]

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        parts = torch.split(feats, self.tap_dims, dim=1)
        return self.fuse(torch.cat([p(x) for p, x in zip(self.proj, parts)], dim=1))

    def forward(self, feats: torch.Tensor, head: Optional[int] = None) -> torch.Tensor:
        z = self.embed(feats)
        return self.heads[-1 if head is None else head](z)

    def add_head(self, n: int) -> None:
        self.heads.append(nn.Linear(self.fc_dim, int(n)))

    def grow_head(self, n_new: int, head: int = 0) -> None:
        """Add ``n_new`` outputs to a head, keeping the old rows (old classes) as they are."""
        old = self.heads[head]
        new = nn.Linear(self.fc_dim, old.out_features + int(n_new))
        with torch.no_grad():
            new.weight[: old.out_features] = old.weight
            new.bias[: old.out_features] = old.bias
        self.heads[head] = new

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def adapter_from_tensors(tensors: Dict[str, torch.Tensor], config: dict) -> MLFFAdapter:
    ad = MLFFAdapter(config["tap_dims"], config["fc_dim"], config["head_sizes"])
    try:
        ad.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise EdgekitError(f"adapter weights do not match its config ({str(e).splitlines()[0][:160]})") from None
    return ad.eval()


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
    from edgekit.ota.adapter import load_adapter
    from edgekit.train.continual import Registry

    reg = Registry.open(registry)
    folder = reg.adapter_folder(task)
    tensors, meta = load_adapter(folder)
    if backbone_artifact is not None:
        from edgekit.runtime.mlff_runner import CompiledBackbone, check_backbone_match, read_backbone_manifest

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
