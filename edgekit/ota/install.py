"""Install signed adapter packages on a device, atomically, and roll back.

The install root's layout, its states (committed, trial, blocked, pinned) and every transition live in one place,
``edgekit.device.state`` (``InstallRoot``); this module verifies packages and calls those transitions.

Crash safety. An install verifies the package in memory, writes it into ROOT/.staging-*, fsyncs every file and
the folder, re-hashes what reached the disk, renames the folder into ROOT/versions/ and then replaces ROOT/current
with a new symlink (``os.replace``, then fsync of ROOT). That replace is the single commit point: before it the
previous version is in service and the new folder is a leftover the next transition removes; after it the new
version is in service. state.json is written (atomically) after the switch, so ``current`` is the truth.
``edgekit install`` (an operator's explicit act) commits directly; ``edgekit update`` stages a *trial* and commits
it only after its health check passes (``edgekit.fleet.update``).

Device backbone. An adapter only fits the backbone it was trained on, identified by ``backbone_sha256``: the
sha256 of the backbone's weights file (defined once in ``edgekit.fleet.backbone``; a compiled backbone
artifact records that value as ``model.backbone_sha256`` in its manifest, it is not the hash of the
artifact's files). The device's value comes from ``--backbone-sha256`` (or ``edgekit install --backbone
ARTIFACT|CKPT|NAME``), else ROOT/backbone.json (written by ``edgekit update --backbone``), else
ROOT/backbone.sha256 (its first word: ``jq -r .model.backbone_sha256 ART/manifest.json`` for an artifact,
``sha256sum weights.pt`` for a weights file). It is not inferred from earlier adapters, which may predate a
backbone upgrade. When none is there, the check is skipped and the result says so.

Every refusal (signature, key, hashes, members, size, backbone, version) happens before ROOT is
touched; every transition holds the flock on ROOT so two of them never interleave.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional

from edgekit.device.state import (BACKBONE_FILE, CURRENT_LINK, DEVICE_BACKBONE_FILE, STATE_NAME, VERSIONS_DIR,
                                  DeviceState, InstallRoot)
from edgekit.errors import EdgekitError
from edgekit.mlff.adapter import load_adapter
from edgekit.ota.keys import TrustedKey
from edgekit.ota.package import DEFAULT_MAX_SIZE, MANIFEST_NAME, SIGNATURE_NAME, VerifiedPackage, verify_package
from edgekit.mlff.version import parse_version
from edgekit.utils import sha256_file

__all__ = ["install_package", "rollback", "read_state", "installed", "active_adapter_dir", "load_installed_adapter",
           "device_backbone_sha256", "package_files", "check_version_folder", "BACKBONE_FILE", "CURRENT_LINK",
           "DEVICE_BACKBONE_FILE", "STATE_NAME", "VERSIONS_DIR"]


def read_state(root: str | os.PathLike) -> DeviceState:
    """What is installed under ``root``, reconciling state.json with the ``current`` link (the truth)."""
    return InstallRoot(root).read()


def installed(root: str | os.PathLike) -> Optional[dict]:
    """The adapter in service under ``root`` (version, path, task, classes, backbone, ...), or None."""
    dev = InstallRoot(root)
    if not dev.path.is_dir():
        return None
    state = dev.read()
    if state.current is None:
        return None
    folder = dev.folder(state.current)
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgekitError(f"{folder / MANIFEST_NAME} is unreadable ({e})") from None
    return {"version": state.current["version"], "path": str(folder),
            **{k: manifest.get(k) for k in ("task", "classes", "backbone", "backbone_sha256", "input",
                                            "key_id", "created_utc")},
            "previous": state.previous["version"] if state.previous else None,
            "trial": state.trial["version"] if state.trial else None, "blocked": dict(state.blocked),
            "pinned": state.pinned, "history": state.history}


def active_adapter_dir(root: str | os.PathLike) -> Optional[Path]:
    """The real folder of the committed adapter in service (None if none), for a runtime.

    First recovers a stale trial (an ``update`` killed during its health check): a trial never serves, so this
    only settles its accounting. Resolved once, so a loader reading several files from it never mixes two
    versions even if an update commits meanwhile (the replaced version is kept as the previous one).
    """
    dev = InstallRoot(root)
    if not dev.path.is_dir():
        return None
    dev.recover()
    info = installed(root)
    return Path(info["path"]) if info else None


def checked_active_adapter_dir(root: str | os.PathLike) -> Path:
    """The folder of the adapter in service, its files checked against the package manifest kept beside it."""
    folder = active_adapter_dir(root)
    if folder is None:
        raise EdgekitError(f"no adapter installed at {root}")
    # every payload file against the package manifest kept beside it (its size and sha256, as verified at install):
    # a byte changed since (bit rot, a bad restore, an edit) is refused here instead of running unnoticed
    try:
        check_version_folder(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EdgekitError(f"the adapter in service at {folder} cannot be checked against its manifest ({e})") \
            from None
    return folder


def load_installed_adapter(root: str | os.PathLike):
    """``(tensors, meta)`` of the adapter in service (torch tensors); an error if nothing is installed."""
    return load_adapter(checked_active_adapter_dir(root))


def load_installed_adapter_arrays(root: str | os.PathLike):
    """``(numpy arrays, meta)`` of the adapter in service, for a station without torch."""
    from edgekit.mlff.adapter import load_adapter_arrays

    return load_adapter_arrays(checked_active_adapter_dir(root))


def device_backbone_sha256(root: str | os.PathLike, override: Optional[str] = None) -> Optional[str]:
    """The device's backbone sha256: ``override`` (--backbone-sha256), else ROOT/backbone.json, else
    ROOT/backbone.sha256, else None."""
    return InstallRoot(root).backbone_sha256(override)


def check_version_folder(folder: Path, manifest: Optional[Mapping] = None) -> None:
    """Every payload file in ``folder`` has the size and sha256 its manifest says."""
    if manifest is None:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    for entry in manifest["files"]:
        path = folder / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise EdgekitError(f"{path} does not match its sha256 in the manifest")


def package_files(pkg: VerifiedPackage) -> dict:
    """What a version folder holds: the payload, the manifest and its signature."""
    return {**pkg.files, MANIFEST_NAME: pkg.manifest_bytes, SIGNATURE_NAME: pkg.signature}


def _check_install_allowed(dev: InstallRoot, pkg: VerifiedPackage, backbone_sha256: Optional[str],
                           allow_downgrade: bool) -> Optional[str]:
    device_backbone = dev.backbone_sha256(backbone_sha256)
    if device_backbone and pkg.manifest["backbone_sha256"] != device_backbone:
        raise EdgekitError(f"backbone mismatch: the adapter fits backbone {pkg.manifest['backbone']} with sha256 "
                           f"{pkg.manifest['backbone_sha256'][:16]}…, this device has {device_backbone[:16]}…")
    current = dev.read().current
    if current and not allow_downgrade:
        if parse_version(pkg.version) <= parse_version(current["version"]):
            raise EdgekitError(f"version {pkg.version} is not newer than the installed {current['version']}; "
                               "use --allow-downgrade to install it anyway")
    return device_backbone


def install_package(package: str | os.PathLike | VerifiedPackage, root: str | os.PathLike,
                    trusted_keys: Mapping[str, TrustedKey] | Iterable[str | os.PathLike] = (),
                    backbone_sha256: Optional[str] = None, allow_downgrade: bool = False,
                    max_size: int = DEFAULT_MAX_SIZE) -> dict:
    """Verify ``package`` and put it in service under ``root``; the replaced version is kept for rollback.

    An operator's explicit install: it commits at once and lifts a block on that version. Raises EdgekitError,
    with ROOT unchanged, for anything that should not be installed.
    """
    dev = InstallRoot(root)
    pkg = package if isinstance(package, VerifiedPackage) else verify_package(package, trusted_keys, max_size)
    _check_install_allowed(dev, pkg, backbone_sha256, allow_downgrade)  # refusals: before ROOT is touched
    with dev.lock():
        # again under the lock: another install may have finished since the first check
        device_backbone = _check_install_allowed(dev, pkg, backbone_sha256, allow_downgrade)
        dev.recover()
        rel_dir = dev.add_version(pkg.version, package_files(pkg), lambda folder: check_version_folder(folder,
                                                                                                   pkg.manifest))
        state = dev.commit_install(rel_dir, pkg.version, pkg.signer.key_id)
    previous = state.previous
    return {"installed": pkg.version, "previous": previous["version"] if previous else None,
            "path": str(dev.folder(state.current)), "task": pkg.manifest["task"], "key_id": pkg.signer.key_id,
            "backbone_checked": device_backbone is not None, "device_backbone_sha256": device_backbone}


def rollback(root: str | os.PathLike, reason: Optional[str] = None) -> dict:
    """Put the previous version back in service (the current one becomes the previous, and is blocked for
    ``edgekit update`` until ``--allow``). ``reason`` is recorded in the history entry."""
    return InstallRoot(root).rollback(reason, check_folder=check_version_folder)
