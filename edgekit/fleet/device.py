"""The adapter in service on a device, runnable: what ``edgekit classify --adapters ROOT`` runs.

A device that ``edgekit update`` (or ``edgekit install``) keeps up to date holds an install root, not an
adapter registry: ROOT/current (the committed version: adapter.json, its weights and the package manifest)
and ROOT/backbone.json (the backbone it runs on, recorded by ``update --backbone``). ``load_device_classifier``
pairs them the way the health check did before the version was committed: the adapter is checked against its
package manifest (``load_installed_adapter``) and run on the recorded backbone, or on ``backbone_artifact``
when given; an adapter that does not fit that backbone is refused with one line.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from edgekit.device.state import CURRENT_LINK, STATE_NAME
from edgekit.errors import EdgekitError


def install_root_of(path: str | os.PathLike) -> Optional[Path]:
    """The install root ``path`` names (ROOT itself, or its ROOT/current link), or None when it is none."""
    p = Path(path)
    if p.name == CURRENT_LINK and p.is_symlink():  # ROOT/current: the version in service, inside ROOT
        p = p.parent
    if p.is_dir() and ((p / STATE_NAME).is_file() or (p / CURRENT_LINK).is_symlink()):
        return p
    return None


def load_device_classifier(root: str | os.PathLike, backbone_artifact: Optional[str | os.PathLike] = None,
                           threads: Optional[int] = None):
    """An ``MLFFClassifier`` of the adapter in service under install root ``root`` on the device's backbone."""
    from edgekit.fleet.backbone import load_device_backbone, read_device_backbone
    from edgekit.mlff.classifier import MLFFClassifier
    from edgekit.mlff.runner import CompiledBackbone, check_backbone_match, read_backbone_manifest
    from edgekit.ota.install import load_installed_adapter_arrays

    arrays, meta = load_installed_adapter_arrays(root)  # numpy: files checked against the package manifest
    where = f"the adapter in service at {root}"
    if backbone_artifact is not None:
        check_backbone_match(read_backbone_manifest(backbone_artifact), meta, where, backbone_artifact)
        backbone = CompiledBackbone(backbone_artifact, threads=threads)
    else:
        identity = read_device_backbone(root)
        if identity is None:
            raise EdgekitError(f"{root} records no backbone (ROOT/backbone.json, written by edgekit update "
                               "--backbone); give the deployed one with --backbone-artifact DIR")
        if (identity.id, identity.sha256) != (meta["backbone"], meta["backbone_sha256"]):
            raise EdgekitError(f"backbone mismatch: {where} was trained on backbone {meta['backbone']} (sha256 "
                               f"{meta['backbone_sha256'][:16]}…), the device records {identity.id} (sha256 "
                               f"{identity.sha256[:16]}…)")
        backbone = load_device_backbone(identity, threads=threads)
    if not isinstance(backbone, CompiledBackbone):  # the frozen PyTorch backbone: heads in PyTorch too
        from edgekit.models.mlff import adapter_from_tensors
        from edgekit.ota.install import load_installed_adapter

        tensors, meta = load_installed_adapter(root)
        return MLFFClassifier(backbone, adapter_from_tensors(tensors, meta["config"]), meta)
    from edgekit.mlff.heads import NumpyAdapter  # a compiled backbone (a station): the heads in numpy, no torch

    return MLFFClassifier(backbone, NumpyAdapter(arrays, meta["config"]), meta)


def load_classifier(adapters: str | os.PathLike, backbone_artifact: Optional[str | os.PathLike] = None,
                    threads: Optional[int] = None):
    """``classify``'s model: a device's install root (or its ROOT/current) runs the adapter in service, any other
    folder is read as an adapter registry (``edgekit adapt``)."""
    root = install_root_of(adapters)
    if root is not None:
        return load_device_classifier(root, backbone_artifact=backbone_artifact, threads=threads)
    from edgekit.mlff.classifier import load_mlff

    return load_mlff(adapters, backbone_artifact=backbone_artifact, threads=threads)
