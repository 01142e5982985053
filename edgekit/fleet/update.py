"""The device side: ``edgekit update``, one safe run from cron or a systemd timer.

1. Lock ROOT/tuf/update.lock (a second run at the same time is refused at once, with one line).
2. TUF refresh with python-tuf's ``ngclient.Updater``: the trust anchor is ``--trust ROOT.json`` (the
   repository's first root, shipped with the device); the newest trusted metadata is kept in
   ROOT/tuf/metadata, so a replayed old timestamp or snapshot, an expired one, metadata signed by a
   revoked key or by too few root keys, and mix-and-match are refused by TUF. Every request has a socket
   timeout, so a server that never answers ends the run.
3. The device's adapter: one target path per task and backbone (``repository.target_path``); nothing to
   do when it is not newer than the version in service.
4. Download (TUF checks length and sha256 before anything else sees it), then the package's own
   verification against the signer key the TUF-signed target metadata names, and the atomic install.
5. Health check (``edgekit.fleet.health``): the installed adapter with the deployed backbone on the
   package's sample images, against the outputs recorded at packaging time; a failure rolls back to the
   previous version automatically (recorded in ROOT/state.json's history).

Refusals before step 4's install leave the install root as it was (only ROOT/tuf, TUF's own trusted
state, may advance) and the current version serving.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from edgekit.errors import EdgekitError

STATE_DIR = "tuf"
LOCK_NAME = "update.lock"
DEFAULT_TIMEOUT = 10  # seconds without a byte before a download is given up


@contextlib.contextmanager
def _update_lock(state_dir: Path):
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EdgekitError(f"another edgekit update is running on {state_dir.parent}; not starting a second") from None
        yield
    finally:
        os.close(fd)


def _serving(current: Optional[dict]) -> str:
    return f"{current['version']} is still in service" if current else "nothing was installed"


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    cause = e.__cause__ or e.__context__
    if not text and cause is not None:
        text = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else type(cause).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def update(repo_url: str, root: str | os.PathLike, trust: str | os.PathLike, backbone: Optional[str] = None,
           task: Optional[str] = None, timeout: int = DEFAULT_TIMEOUT, health: bool = True) -> dict:
    """One update run; returns what happened, raises EdgekitError (one line) on any refusal."""
    try:
        from tuf.ngclient import Updater, Urllib3Fetcher
    except ImportError:
        from edgekit.errors import MissingBackendError

        raise MissingBackendError("edgekit update", "tuf") from None
    from edgekit.fleet.backbone import read_device_backbone, record_device_backbone, resolve_backbone
    from edgekit.fleet.repository import METADATA_DIR, TARGETS_DIR, target_path
    from edgekit.ota.install import installed
    from edgekit.mlff.version import parse_version

    root = Path(root)
    trust = Path(trust)
    if not trust.is_file():
        raise EdgekitError(f"--trust {trust}: file not found (the repository's trusted root metadata)")
    if root.exists() and not root.is_dir():
        raise EdgekitError(f"install root {root} is not a folder")
    if timeout < 1:
        raise EdgekitError("--timeout must be at least 1 second")
    identity = resolve_backbone(backbone) if backbone else None  # before anything is written
    if identity is None and read_device_backbone(root) is None:
        raise EdgekitError(f"no backbone recorded in {root}; give --backbone ARTIFACT|CKPT|NAME")
    if task is None and installed(root) is None:
        raise EdgekitError(f"no adapter installed at {root} yet; give --task")
    state_dir = root / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    with _update_lock(state_dir):
        recorded = read_device_backbone(root)
        identity = identity or recorded
        if identity is None:
            raise EdgekitError(f"no backbone recorded in {root}; give --backbone ARTIFACT|CKPT|NAME")
        current = installed(root)
        task = task or (current["task"] if current else None)
        if not task:
            raise EdgekitError(f"no adapter installed at {root} yet; give --task")
        if current and task != current["task"]:
            raise EdgekitError(f"--task {task}: the adapter in service is for task {current['task']}")

        base = repo_url.rstrip("/")
        meta_dir, downloads = state_dir / "metadata", state_dir / "downloads"
        meta_dir.mkdir(exist_ok=True)
        path = target_path(task, identity.sha256)
        try:
            updater = Updater(str(meta_dir), f"{base}/{METADATA_DIR}/", str(downloads), f"{base}/{TARGETS_DIR}/",
                              fetcher=Urllib3Fetcher(socket_timeout=timeout), bootstrap=trust.read_bytes())
            updater.refresh()
            info = updater.get_targetinfo(path)
        except Exception as e:  # network, HTTP, TUF verification, local metadata: all a refusal
            raise EdgekitError(f"update refused: repository metadata did not verify or could not be fetched "
                               f"({_why(e)}); {_serving(current)}") from None
        base_result = {"task": task, "target": path, "backbone": identity.id, "backbone_sha256": identity.sha256,
                       "previous": current["version"] if current else None}
        if backbone and identity != recorded:
            record_device_backbone(root, identity)  # the device's backbone, as given: fetching worked
        if info is None:
            return {**base_result, "action": "none", "version": current["version"] if current else None,
                    "reason": f"the repository has no adapter for task {task} on backbone {identity.id}"}
        meta = (info.custom or {}).get("edgekit") if isinstance(info.custom, dict) else None
        if not isinstance(meta, dict) or not isinstance(meta.get("package_key"), str):
            raise EdgekitError(f"update refused: target {path} has no edgekit metadata; {_serving(current)}")
        version = meta.get("version")
        parse_version(version)
        if current and parse_version(version) <= parse_version(current["version"]):
            return {**base_result, "action": "none", "version": current["version"],
                    "reason": f"{current['version']} is the newest for this task and backbone"}

        shutil.rmtree(downloads, ignore_errors=True)
        downloads.mkdir()
        try:
            file = updater.download_target(info, filepath=str(downloads / f"{info.hashes['sha256']}.zip"))
        except Exception as e:
            shutil.rmtree(downloads, ignore_errors=True)
            raise EdgekitError(f"update refused: download of {path} {version} failed or did not verify "
                               f"({_why(e)}); {_serving(current)}") from None
        try:
            result = _install_checked(file, root, meta, identity, current, health, version)
        finally:
            shutil.rmtree(downloads, ignore_errors=True)
        return {**base_result, **result}


def _package_key(meta: dict):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edgekit.ota.keys import TrustedKey, key_id

    try:
        pk = Ed25519PublicKey.from_public_bytes(bytes.fromhex(meta["package_key"]))
    except ValueError:
        raise EdgekitError("update refused: the target's package key is malformed") from None
    kid = key_id(pk)
    return {kid: TrustedKey(kid, pk, f"repository package key {kid[:16]}…")}


def _install_checked(file: str, root: Path, meta: dict, identity, current: Optional[dict], health: bool,
                     version: str) -> dict:
    """Verify + install the downloaded package, then the health check with rollback on failure."""
    from edgekit.fleet.backbone import load_device_backbone
    from edgekit.fleet.health import check_health
    from edgekit.ota.install import install_package, rollback
    from edgekit.ota.package import verify_package

    try:
        pkg = verify_package(file, _package_key(meta))
    except EdgekitError as e:
        raise EdgekitError(f"update refused: {e}; {_serving(current)}") from None
    if (pkg.manifest["task"], pkg.manifest["version"], pkg.manifest["backbone_sha256"]) != \
            (meta.get("task"), version, meta.get("backbone_sha256")):
        raise EdgekitError(f"update refused: the package is not the one its target metadata describes; "
                           f"{_serving(current)}")
    has_health = health and pkg.manifest.get("health")
    backbone = load_device_backbone(identity) if has_health else None
    if has_health and current is None:
        # a fresh device has nothing to roll back to: check the package before it goes in service
        with tempfile.TemporaryDirectory(prefix=".health-", dir=root / "tuf") as tmp:
            for name, data in {**pkg.files, "manifest.json": pkg.manifest_bytes}.items():
                Path(tmp, name).write_bytes(data)
            h = check_health(tmp, backbone)
        if not h["ok"]:
            raise EdgekitError(f"update refused: health check of {version} failed ({h['reason']}); nothing was "
                               "installed")
    result = install_package(pkg, root, backbone_sha256=identity.sha256)
    out = {"action": "installed", "version": version, "path": result["path"], "health": None}
    if has_health and current is not None:
        h = check_health(result["path"], backbone)
        out["health"] = h
        if not h["ok"]:
            back = rollback(root, reason=f"health check of {version} failed")
            raise EdgekitError(f"health check of {version} failed ({h['reason']}); rolled back to {back['version']}")
    elif has_health:
        out["health"] = h
    return out
