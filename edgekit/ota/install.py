"""Install signed adapter packages on a device, atomically, and roll back.

Install root layout::

    ROOT/versions/<version>/      the kept versions (the one in service and the previous one): the adapter
                                  files (adapter.json, *.safetensors) plus the package's manifest.json and
                                  manifest.sig; files are read-only. A version installed again while its
                                  folder is still kept goes to versions/<version>~2, ~3, ...
    ROOT/current -> versions/<v>  relative symlink: the version in service
    ROOT/state.json               {"format": "edgekit-ota-state", "format_version": 1,
                                   "current": {"version", "dir"}, "previous": {"version", "dir"} | null,
                                   "history": [{"time", "action", "version", "from", "key_id"}, ...]}
    ROOT/backbone.json            optional: the deployed backbone (id, backbone_sha256, ref), see below
    ROOT/backbone.sha256          optional, written by whoever deploys the backbone (see below)
    ROOT/.staging-*               an install in progress (or a crashed one, removed by the next install)

Crash safety. An install verifies the package in memory, writes it into ROOT/.staging-*, fsyncs every
file and the folder, re-hashes what reached the disk, renames the folder into ROOT/versions/ and then
replaces ROOT/current with a new symlink (``os.replace``, then fsync of ROOT). That replace is the
single commit point: before it the previous version is in service and the new folder is a leftover
the next install removes; after it the new version is in service. state.json is written (atomically)
after the switch, so ``current`` is the truth: if a crash falls between the two, readers see that
``current`` differs from state.json's record and take the recorded version as the previous one
(exactly what the finished operation would have written). Rollback switches ``current`` the same way.

Device backbone. An adapter only fits the backbone it was trained on, identified by ``backbone_sha256``: the
sha256 of the backbone's weights file (defined once in ``edgekit.fleet.backbone``; a compiled backbone
artifact records that value as ``model.backbone_sha256`` in its manifest, it is not the hash of the
artifact's files). The device's value comes from ``--backbone-sha256`` (or ``edgekit install --backbone
ARTIFACT|CKPT|NAME``), else ROOT/backbone.json (written by ``edgekit update --backbone``), else
ROOT/backbone.sha256 (its first word: ``jq -r .model.backbone_sha256 ART/manifest.json`` for an artifact,
``sha256sum weights.pt`` for a weights file). It is not inferred from earlier adapters, which may predate a
backbone upgrade. When none is there, the check is skipped and the result says so.

Every refusal (signature, key, hashes, members, size, backbone, version) happens before ROOT is
touched; install and rollback hold an flock on ROOT so two of them never interleave.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Tuple

from edgekit.errors import EdgekitError
from edgekit.mlff.adapter import is_sha256, load_adapter
from edgekit.ota.keys import TrustedKey
from edgekit.ota.package import (DEFAULT_MAX_SIZE, MANIFEST_NAME, SIGNATURE_NAME, VerifiedPackage, utc_now,
                                 verify_package)
from edgekit.mlff.version import parse_version
from edgekit.utils import atomic_write, sha256_file

STATE_NAME = "state.json"
STATE_FORMAT = "edgekit-ota-state"
STATE_FORMAT_VERSION = 1
CURRENT_LINK = "current"
VERSIONS_DIR = "versions"
BACKBONE_FILE = "backbone.sha256"
DEVICE_BACKBONE_FILE = "backbone.json"
STAGING_PREFIX = ".staging-"
LINK_TMP_PREFIX = ".current-"
HISTORY_KEPT = 100
_VERSION_DIR_RE = re.compile(r"^versions/[0-9]+\.[0-9]+\.[0-9]+(~[0-9]+)?$")


@dataclass
class InstallState:
    """What is in service and what rollback would return to; entries are {"version", "dir"}."""

    current: Optional[dict] = None
    previous: Optional[dict] = None
    history: List[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION, "current": self.current,
                "previous": self.previous, "history": self.history[-HISTORY_KEPT:]}


# --- small filesystem helpers -------------------------------------------------------------

def _os_error_text(e: OSError) -> str:
    return f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _locked(root: Path):
    """An exclusive flock on the ROOT folder itself (no lock file, so nothing is left in ROOT)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EdgekitError(f"another install or rollback is running on {root}; try again") from None
        yield
    finally:
        os.close(fd)  # releases the lock


# --- reading the state ----------------------------------------------------------------------------

def _check_root(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise EdgekitError(f"install root {root} is not a folder")


def _read_current_link(root: Path) -> Optional[str]:
    """The ``versions/<name>`` that ROOT/current points to, or None when nothing is in service."""
    link = root / CURRENT_LINK
    if not link.is_symlink():
        if link.exists():
            raise EdgekitError(f"{link} is not a symlink; edgekit did not make it, move it away")
        return None
    target = os.readlink(link)
    if not _VERSION_DIR_RE.match(target) or not (root / target).is_dir():
        raise EdgekitError(f"{link} points to {target!r}, not to a version folder in {root / VERSIONS_DIR}")
    return target


def _version_of_dir(root: Path, rel_dir: str) -> str:
    try:
        return json.loads((root / rel_dir / MANIFEST_NAME).read_text(encoding="utf-8"))["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return Path(rel_dir).name.split("~")[0]


def read_state(root: str | os.PathLike) -> InstallState:
    """What is installed under ``root``, reconciling state.json with the ``current`` link (the truth)."""
    root = Path(root)
    _check_root(root)
    state_path = root / STATE_NAME
    recorded: dict = {}
    if state_path.is_file():
        try:
            recorded = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise EdgekitError(f"{state_path} is unreadable ({e}); fix or remove it") from None
        if not isinstance(recorded, dict) or recorded.get("format") != STATE_FORMAT:
            raise EdgekitError(f"{state_path} is not an edgekit install state; fix or remove it")
    state = InstallState(recorded.get("current"), recorded.get("previous"), list(recorded.get("history") or []))
    active = _read_current_link(root)
    if active is None:
        return InstallState(history=state.history)
    if state.current is None or state.current.get("dir") != active:
        # the last switch was committed but a crash kept it from being recorded
        state.previous = state.current
        state.current = {"version": _version_of_dir(root, active), "dir": active}
    return state


def installed(root: str | os.PathLike) -> Optional[dict]:
    """The adapter in service under ``root`` (version, path, task, classes, backbone, ...), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    state = read_state(root)
    if state.current is None:
        return None
    folder = (root / state.current["dir"]).resolve()
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgekitError(f"{folder / MANIFEST_NAME} is unreadable ({e})") from None
    return {"version": state.current["version"], "path": str(folder),
            **{k: manifest.get(k) for k in ("task", "classes", "backbone", "backbone_sha256", "input",
                                            "key_id", "created_utc")},
            "previous": state.previous["version"] if state.previous else None,
            "history": state.history}


def active_adapter_dir(root: str | os.PathLike) -> Optional[Path]:
    """The real folder of the adapter in service (None if none).

    Resolved once, so a loader reading several files from it never mixes two versions even if an
    install switches ``current`` meanwhile (the replaced version is kept as the previous one).
    """
    info = installed(root)
    return Path(info["path"]) if info else None


def load_installed_adapter(root: str | os.PathLike):
    """``(tensors, meta)`` of the adapter in service; an error if nothing is installed."""
    folder = active_adapter_dir(root)
    if folder is None:
        raise EdgekitError(f"no adapter installed at {root}")
    return load_adapter(folder)


def device_backbone_sha256(root: Path, override: Optional[str] = None) -> Optional[str]:
    """The device's backbone sha256: ``override`` (--backbone-sha256), else ROOT/backbone.json, else
    ROOT/backbone.sha256, else None."""
    if override is not None:
        value = override.strip().lower()
        if not is_sha256(value):
            raise EdgekitError(f"--backbone-sha256 {override!r} is not a sha256 (64 hex digits)")
        return value
    recorded = root / DEVICE_BACKBONE_FILE
    if recorded.is_file():
        try:
            value = json.loads(recorded.read_text(encoding="utf-8"))["backbone_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            value = None
        if not is_sha256(value):
            raise EdgekitError(f"{recorded} has no valid backbone_sha256; fix or remove it")
        return value
    path = root / BACKBONE_FILE
    if not path.is_file():
        return None
    words = path.read_text(encoding="utf-8", errors="replace").split()
    value = words[0].lower() if words else ""
    if not is_sha256(value):
        raise EdgekitError(f"{path} does not start with a sha256 (64 hex digits)")
    return value


# --- changing the state ---------------------------------------------------------------------------

def _switch_current(root: Path, rel_dir: str) -> None:
    """Point ROOT/current at ``rel_dir`` atomically: a new symlink renamed over the old one."""
    tmp = root / f"{LINK_TMP_PREFIX}{secrets.token_hex(6)}"
    os.symlink(rel_dir, tmp)
    try:
        os.replace(tmp, root / CURRENT_LINK)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(root)


def _write_state(root: Path, state: InstallState) -> None:
    with atomic_write(root / STATE_NAME, "w") as f:
        os.fchmod(f.fileno(), 0o644)  # readable by a runtime running as another user
        json.dump(state.to_json(), f, indent=2)
        f.write("\n")
    _fsync_dir(root)


def _remove_leftovers(root: Path, state: InstallState) -> None:
    """Crashed stagings, stray temp links, and version folders neither in service nor kept for rollback."""
    keep = {e["dir"] for e in (state.current, state.previous) if e}
    for entry in root.iterdir():
        if entry.name.startswith(LINK_TMP_PREFIX) and entry.is_symlink():
            with contextlib.suppress(OSError):
                entry.unlink()
        elif entry.name.startswith(STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
    versions = root / VERSIONS_DIR
    if versions.is_dir():
        for entry in versions.iterdir():
            if f"{VERSIONS_DIR}/{entry.name}" not in keep and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)


def _free_version_dir(root: Path, version: str) -> str:
    name, n = version, 1
    while (root / VERSIONS_DIR / name).exists():
        n += 1
        name = f"{version}~{n}"
    return f"{VERSIONS_DIR}/{name}"


def _check_version_folder(folder: Path, manifest: Mapping) -> None:
    """Every payload file in ``folder`` has the size and sha256 its manifest says."""
    for entry in manifest["files"]:
        path = folder / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise EdgekitError(f"{path} does not match its sha256 in the manifest")


def _stage(root: Path, pkg: VerifiedPackage) -> Path:
    """Write the package into a new ROOT/.staging-* folder, durably, and check what reached the disk."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    try:
        for name, data in pkg.files.items():
            _write_synced(staging / name, data)
        _write_synced(staging / MANIFEST_NAME, pkg.manifest_bytes)
        _write_synced(staging / SIGNATURE_NAME, pkg.signature)
        _check_version_folder(staging, pkg.manifest)
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; the runtime may run as another user
        _fsync_dir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _check_install_allowed(root: Path, pkg: VerifiedPackage, backbone_sha256: Optional[str],
                           allow_downgrade: bool) -> Tuple[InstallState, Optional[str]]:
    device_backbone = device_backbone_sha256(root, backbone_sha256)
    if device_backbone and pkg.manifest["backbone_sha256"] != device_backbone:
        raise EdgekitError(f"backbone mismatch: the adapter fits backbone {pkg.manifest['backbone']} with sha256 "
                           f"{pkg.manifest['backbone_sha256'][:16]}…, this device has {device_backbone[:16]}…")
    state = read_state(root) if root.is_dir() else InstallState()
    if state.current and not allow_downgrade:
        installed_version = state.current["version"]
        if parse_version(pkg.version) <= parse_version(installed_version):
            raise EdgekitError(f"version {pkg.version} is not newer than the installed {installed_version}; "
                               "use --allow-downgrade to install it anyway")
    return state, device_backbone


def install_package(package: str | os.PathLike | VerifiedPackage, root: str | os.PathLike,
                    trusted_keys: Mapping[str, TrustedKey] | Iterable[str | os.PathLike] = (),
                    backbone_sha256: Optional[str] = None, allow_downgrade: bool = False,
                    max_size: int = DEFAULT_MAX_SIZE) -> dict:
    """Verify ``package`` and put it in service under ``root``; the replaced version is kept for rollback.

    Raises EdgekitError, with ROOT unchanged, for anything that should not be installed.
    """
    root = Path(root)
    _check_root(root)
    pkg = package if isinstance(package, VerifiedPackage) else verify_package(package, trusted_keys, max_size)
    _check_install_allowed(root, pkg, backbone_sha256, allow_downgrade)  # refusals: before ROOT is touched

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgekitError(f"cannot create install root {root}: {_os_error_text(e)}") from None
    with _locked(root):
        # again under the lock: another install may have finished since the first check
        state, device_backbone = _check_install_allowed(root, pkg, backbone_sha256, allow_downgrade)
        previous = state.current
        new_dir = _put_in_service(root, pkg, state)
        new_state = InstallState(
            current={"version": pkg.version, "dir": new_dir}, previous=previous,
            history=state.history + [{"time": utc_now(), "action": "install", "version": pkg.version,
                                      "from": previous["version"] if previous else None,
                                      "key_id": pkg.signer.key_id}])
        _record(root, new_state)
        _remove_leftovers(root, new_state)
    return {"installed": pkg.version, "previous": previous["version"] if previous else None,
            "path": str((root / new_dir).resolve()), "task": pkg.manifest["task"], "key_id": pkg.signer.key_id,
            "backbone_checked": device_backbone is not None, "device_backbone_sha256": device_backbone}


def _put_in_service(root: Path, pkg: VerifiedPackage, state: InstallState) -> str:
    """Stage the package, move it into versions/ and switch ROOT/current to it; returns its folder.

    If anything fails before the switch, the new folder is removed and the old version stays in service.
    """
    staging = new_dir = None
    try:
        _remove_leftovers(root, state)
        (root / VERSIONS_DIR).mkdir(exist_ok=True)
        _fsync_dir(root)
        staging = _stage(root, pkg)
        new_dir = _free_version_dir(root, pkg.version)
        os.rename(staging, root / new_dir)
        _fsync_dir(root / VERSIONS_DIR)
        _switch_current(root, new_dir)  # the commit point
        return new_dir
    except BaseException as e:
        committed = False
        with contextlib.suppress(Exception):
            committed = new_dir is not None and _read_current_link(root) == new_dir
        if committed:  # the switch happened; only a later fsync failed
            raise
        for leftover in (staging, new_dir and root / new_dir):
            if leftover:
                shutil.rmtree(leftover, ignore_errors=True)
        if isinstance(e, OSError):
            still = f"{state.current['version']} is still in service" if state.current else "nothing is in service"
            raise EdgekitError(f"install of {pkg.version} failed ({_os_error_text(e)}); {still}") from e
        raise


def _record(root: Path, state: InstallState) -> None:
    """Write state.json after a switch; the switch stands even if this fails (see the module docstring)."""
    try:
        _write_state(root, state)
    except OSError as e:
        raise EdgekitError(f"{state.current['version']} is in service but {root / STATE_NAME} could not be "
                           f"updated ({_os_error_text(e)}); it is reconciled on the next install or rollback") from e


def rollback(root: str | os.PathLike, reason: Optional[str] = None) -> dict:
    """Put the previous version back in service (the current one becomes the previous).

    ``reason`` (e.g. a failed health check) is recorded in the history entry."""
    root = Path(root)
    _check_root(root)
    if not root.is_dir():
        raise EdgekitError(f"nothing to roll back: {root} does not exist")
    with _locked(root):
        state = read_state(root)
        if state.current is None:
            raise EdgekitError(f"nothing to roll back: no adapter is installed at {root}")
        if state.previous is None:
            raise EdgekitError(f"nothing to roll back: no previous version is kept at {root} "
                               f"({state.current['version']} is the only one)")
        folder = root / state.previous["dir"]
        try:
            manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
            _check_version_folder(folder, manifest)
        except (OSError, ValueError, KeyError, TypeError, EdgekitError) as e:
            raise EdgekitError(f"previous version {state.previous['version']} at {folder} is damaged ({e}); "
                               "not rolling back") from None
        try:
            _switch_current(root, state.previous["dir"])  # the commit point
        except OSError as e:
            if _read_current_link(root) == state.previous["dir"]:  # switched; only the fsync after it failed
                raise
            raise EdgekitError(f"rollback failed ({_os_error_text(e)}); {state.current['version']} is still in "
                               "service") from e
        new_state = InstallState(
            current=state.previous, previous=state.current,
            history=state.history + [{"time": utc_now(), "action": "rollback", "version": state.previous["version"],
                                      "from": state.current["version"], "key_id": manifest.get("key_id"),
                                      **({"reason": reason} if reason else {})}])
        _record(root, new_state)
    return {"version": new_state.current["version"], "from": new_state.previous["version"],
            "path": str(folder.resolve())}
