"""The MLFF adapter registry on disk: the file format shared by training, runtime, deployment and OTA.

Registry folder::

    registry.json                  backbone (id, ref, sha256), setting, fc_dim, the tasks in order
    adapters/<NN>-<task>/          the adapter after task NN, in edgekit.mlff.adapter format
                                   (adapter.json + adapter.safetensors; trunk and every head so far)
    exemplars.safetensors          rehearsal buffer: pooled backbone features of K images per class
    cache/                         pooled backbone features per image (default feature cache)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from edgekit.errors import EdgekitError
from edgekit.utils import atomic_write

if TYPE_CHECKING:  # the PyTorch side only: a station opens registries without torch
    import torch

    from edgekit.models.mlff import MLFFAdapter

REGISTRY_FORMAT = "edgekit-mlff-registry"
REGISTRY_NAME = "registry.json"
EXEMPLARS_NAME = "exemplars.safetensors"


def is_registry(path: str | os.PathLike) -> bool:
    """A folder holding registry.json (what ``edgekit bench REGISTRY`` and ``compile REGISTRY`` take)."""
    p = Path(path)
    return p.is_dir() and (p / REGISTRY_NAME).is_file()


@dataclass
class Registry:
    folder: Path
    meta: dict = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "Registry":
        folder = Path(folder)
        path = folder / REGISTRY_NAME
        if not path.is_file():
            raise EdgekitError(f"{folder} is not an adapter registry (no {REGISTRY_NAME}); add a task with edgekit adapt")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EdgekitError(f"{path}: not readable JSON ({e})") from None
        if meta.get("format") != REGISTRY_FORMAT:
            raise EdgekitError(f"{path}: not an edgekit MLFF registry")
        return cls(folder, meta)

    @classmethod
    def open_or_create(cls, folder: str | os.PathLike, backbone, setting: str, fc_dim: int) -> "Registry":
        folder = Path(folder)
        if (folder / REGISTRY_NAME).is_file():
            reg = cls.open(folder)
            if reg.meta["backbone"] != backbone.id:
                raise EdgekitError(f"registry {folder} uses backbone {reg.meta['backbone']}, not {backbone.id}")
            if reg.meta["setting"] != setting:
                raise EdgekitError(f"registry {folder} is {reg.meta['setting']}, not {setting}")
            return reg
        if folder.exists() and (not folder.is_dir() or any(p.name != "cache" for p in folder.iterdir())):
            raise EdgekitError(f"{folder} exists and is not an adapter registry; pick a new or empty folder")
        return cls(folder, {"format": REGISTRY_FORMAT, "format_version": 1, "backbone": backbone.id,
                            "backbone_ref": backbone.ref, "backbone_sha256": backbone.weights_sha256,
                            "setting": setting, "fc_dim": int(fc_dim), "tasks": []})

    @property
    def tasks(self) -> List[dict]:
        return self.meta["tasks"]

    def save(self) -> None:
        with atomic_write(self.folder / REGISTRY_NAME, "w") as f:
            json.dump(self.meta, f, indent=2)
            f.write("\n")

    def adapter_folder(self, task: Optional[str] = None) -> Path:
        if not self.tasks:
            raise EdgekitError(f"registry {self.folder} has no tasks yet")
        if task is None:
            return self.folder / self.tasks[-1]["adapter"]
        for t in self.tasks:
            if t["task"] == task:
                return self.folder / t["adapter"]
        raise EdgekitError(f"task {task!r} is not in registry {self.folder}")

    def load_adapter(self) -> Optional[MLFFAdapter]:
        if not self.tasks:
            return None
        from edgekit.mlff.adapter import load_adapter
        from edgekit.models.mlff import adapter_from_tensors

        tensors, meta = load_adapter(self.adapter_folder())
        return adapter_from_tensors(tensors, meta["config"])

    def load_exemplars(self):
        path = self.folder / EXEMPLARS_NAME
        if not path.is_file():
            return None
        import safetensors.torch

        return safetensors.torch.load(path.read_bytes())

    def save_exemplars(self, tensors: Dict[str, torch.Tensor]) -> None:
        import safetensors.torch

        with atomic_write(self.folder / EXEMPLARS_NAME) as f:
            f.write(safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}))
