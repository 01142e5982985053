"""The device's backbone: what ``backbone_sha256`` means, once, and how a device names its backbone.

``backbone_sha256`` is the sha256 of the backbone's **weights file**: the file ``edgekit adapt`` trained on
(for EfficientNet-Lite0 the packaged weights file, for a GMBINet backbone its checkpoint file), i.e.
``edgekit.models.backbones.Backbone.weights_sha256``. Adapters, registries and packages record it, and a
compiled ``mlff-backbone`` artifact records the same value as ``model.backbone_sha256`` in its manifest (the
artifact's own files have other hashes, checked by its manifest). So a device with a compiled backbone gets
the value from the artifact's manifest, never by hashing the artifact's files.

A device names its backbone by an artifact folder, a weights/checkpoint file or a backbone name
(``--backbone``); ``resolve_backbone`` gives its identity and ``load_device_backbone`` an object with the
``preprocess`` / ``pooled`` interface the health check runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from edgekit.device.state import InstallRoot
from edgekit.errors import EdgekitError


@dataclass(frozen=True)
class BackboneIdentity:
    id: str
    sha256: str  # backbone_sha256: the sha256 of the backbone weights file (see the module docstring)
    ref: str  # what was given: artifact folder, weights file or name
    kind: str  # "artifact" or "weights"
    # the backbone package's version when it came from the repository (``update --backbone repo:NAME``): the
    # device's rollback counter for its backbone, so an older package is never installed over a newer one
    version: Optional[str] = field(default=None, compare=False)

    def to_json(self) -> dict:
        return {"backbone": self.id, "backbone_sha256": self.sha256, "ref": self.ref, "kind": self.kind,
                **({"version": self.version} if self.version else {})}


def _is_artifact(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def resolve_backbone(ref: str | os.PathLike) -> BackboneIdentity:
    """The identity of a backbone artifact folder, weights / checkpoint file, or backbone name."""
    path = Path(ref)
    if _is_artifact(path):
        from edgekit.mlff.runner import read_backbone_manifest

        m = read_backbone_manifest(path)["model"]
        return BackboneIdentity(m["backbone"], m["backbone_sha256"], str(path.resolve()), "artifact")
    if path.is_dir():
        raise EdgekitError(f"backbone {ref} is a folder without manifest.json, not a compiled backbone artifact")
    from edgekit.models.backbones import load_backbone

    bb = load_backbone(str(ref))
    return BackboneIdentity(bb.id, bb.weights_sha256, str(path.resolve()) if path.exists() else str(ref), "weights")


def load_device_backbone(identity: BackboneIdentity, threads: Optional[int] = None):
    """The backbone, runnable: a CompiledBackbone for an artifact, else the frozen PyTorch backbone."""
    if identity.kind == "artifact":
        from edgekit.mlff.runner import CompiledBackbone

        bb = CompiledBackbone(identity.ref, threads=threads)
    else:
        from edgekit.models.backbones import load_backbone

        bb = load_backbone(identity.ref)
    if (bb.id, bb.weights_sha256) != (identity.id, identity.sha256):
        raise EdgekitError(f"backbone {identity.ref} changed since it was recorded (now {bb.id}, sha256 "
                           f"{bb.weights_sha256[:16]}…)")
    return bb


def record_device_backbone(root: str | os.PathLike, identity: BackboneIdentity) -> None:
    """Write ROOT/backbone.json (what ``edgekit install`` and ``edgekit update`` check packages against); the
    record itself belongs to the install root's state (``edgekit.device.state``)."""
    InstallRoot(root).record_backbone(identity.to_json())


def read_device_backbone(root: str | os.PathLike) -> Optional[BackboneIdentity]:
    """ROOT/backbone.json, or None when the install root records no backbone."""
    d = InstallRoot(root).read_backbone()
    return BackboneIdentity(d["backbone"], d["backbone_sha256"], d["ref"], d["kind"], d.get("version")) if d else None
