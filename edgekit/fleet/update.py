"""The device side: ``edgekit update``, one safe run from cron or a systemd timer.

1. Lock ROOT/tuf/update.lock (a second run at the same time is refused at once, with one line), then recover a
   stale trial left by a run that was killed during its health check (``InstallRoot.recover``), and apply the
   operator's acts given with this run (``--allow``, ``--pin``, ``--unpin``).
2. TUF refresh with python-tuf's ``ngclient.Updater``: the trust anchor is ``--trust ROOT.json`` (the
   repository's first root, shipped with the device); the newest trusted metadata is kept in
   ROOT/tuf/metadata, so a replayed old timestamp or snapshot, an expired one, metadata signed by a
   revoked key or by too few root keys, and mix-and-match are refused by TUF. Liveness: every request has a
   per-read timeout (``--timeout``) and every file and the whole run a total deadline (``--file-deadline``,
   ``--deadline``; ``edgekit.fleet.fetch``), TUF's slow-retrieval defence. Time: expiry is judged against
   max(device clock, the time floor), the floor being the highest time seen at a verified refresh (persisted in
   ROOT/tuf/trusted-time.json) or given by the caller (``time_floor``, e.g. a trust bundle's issue time), so a
   clock set back does not bring an expired timestamp back to life (TUF's freeze-attack defence needs a clock
   that does not go back; Uptane's deployment best practices ask for a secure source of time).
3. The device's adapter: one target path per task and backbone (``repository.target_path``); nothing to
   do when it is not newer than the version in service, when the device is pinned to another version, or when
   it is blocked (it failed its check, was interrupted twice, or was rolled back): the latter exits 3 with one
   line, so monitoring sees a bad version that stays published.
4. Download (TUF checks length and sha256 before anything else sees it), then the package's own
   verification against the signer key, then the transaction (``edgekit.device.state``): the version is staged
   and recorded as a TRIAL, never pointed to by ROOT/current; the health check (``edgekit.fleet.health``) runs on
   the trial folder; only when it passes is ROOT/current switched to it (the commit). A failed check (of any
   kind: ``check_health`` fails closed, and any exception around it is a failure too) discards the trial and
   blocks the version. Any interruption (kill -9, power loss) leaves the previous committed version serving.

Refusals before step 4 leave the install root as it was (only ROOT/tuf, TUF's own trusted state and the time
floor, may advance) and the current version serving.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from edgekit.errors import EdgekitError

STATE_DIR = "tuf"
LOCK_NAME = "update.lock"
DEFAULT_TIMEOUT = 10  # seconds without a byte before a download is given up
DEFAULT_DEADLINE = 300  # seconds for all the downloads of one run
DEFAULT_FILE_DEADLINE = 120  # seconds for one file, headers and body
BLOCKED_EXIT_CODE = 3


class BlockedVersionError(EdgekitError):
    """The repository's newest version for this device is blocked here: nothing is installed (exit 3)."""

    exit_code = BLOCKED_EXIT_CODE


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


def _apply_time_floor(updater, floor: Optional[float]) -> None:
    """Judge expiry against max(device clock, floor). python-tuf's TrustedMetadataSet takes its reference time
    from the clock once, when it is created (``reference_time``); raising that attribute before ``refresh`` is
    the one place to do it without forking python-tuf. Refuses (fails closed) if this python-tuf has no such
    attribute."""
    if not floor:
        return
    trusted = getattr(updater, "_trusted_set", None)
    if trusted is None or not isinstance(getattr(trusted, "reference_time", None), datetime):
        raise EdgekitError("update refused: this python-tuf keeps no reference time edgekit can hold at the device's "
                           "time floor (install the tuf version setup.py names)")
    floor_time = datetime.fromtimestamp(floor, timezone.utc)
    if floor_time > trusted.reference_time:
        trusted.reference_time = floor_time


def update(repo_url: str, root: str | os.PathLike, trust: str | os.PathLike, backbone: Optional[str] = None,
           task: Optional[str] = None, timeout: int = DEFAULT_TIMEOUT, health: bool = True,
           deadline: float = DEFAULT_DEADLINE, file_deadline: float = DEFAULT_FILE_DEADLINE,
           allow: Optional[str] = None, pin: Optional[str] = None, unpin: bool = False,
           time_floor: Optional[float] = None) -> dict:
    """One update run; returns what happened, raises EdgekitError (one line) on any refusal.

    ``allow``: unblock that version first; ``pin`` / ``unpin``: hold the device at a version / release it;
    ``time_floor`` (seconds since the epoch): expiry is judged at no earlier time than this (a trust bundle's
    issue time); ``deadline`` / ``file_deadline``: seconds for all downloads of the run / for one file.
    """
    started = time.monotonic()
    try:
        from tuf.ngclient import Updater
    except ImportError:
        from edgekit.errors import MissingBackendError

        raise MissingBackendError("edgekit update", "tuf") from None
    from edgekit.device.state import InstallRoot
    from edgekit.fleet.backbone import read_device_backbone, record_device_backbone, resolve_backbone
    from edgekit.fleet.fetch import DeadlineFetcher
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
    if not deadline > 0 or not file_deadline > 0:
        raise EdgekitError("--deadline and --file-deadline must be positive")
    if pin and unpin:
        raise EdgekitError("give --pin VERSION or --unpin, not both")
    for opt, v in (("--allow", allow), ("--pin", pin)):
        if v is not None:
            try:
                parse_version(v)
            except EdgekitError as e:
                raise EdgekitError(f"{opt}: {e}") from None
    if time_floor is not None and not (time_floor == time_floor and abs(time_floor) < 1e11):
        raise EdgekitError(f"time floor {time_floor!r} is not a time in seconds since the epoch")
    identity = resolve_backbone(backbone) if backbone else None  # before anything is written
    if identity is None and read_device_backbone(root) is None:
        raise EdgekitError(f"no backbone recorded in {root}; give --backbone ARTIFACT|CKPT|NAME")
    if task is None and installed(root) is None:
        raise EdgekitError(f"no adapter installed at {root} yet; give --task")
    dev = InstallRoot(root)
    state_dir = root / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    with _update_lock(state_dir):
        recovered = dev.recover()  # a trial left by a killed run: discarded, counted
        dev.tidy()  # and whatever else a killed run left (a staging folder, a temp record)
        if allow:
            dev.allow(allow)
        if unpin:
            dev.pin(None)
        if pin:
            dev.pin(pin)
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
        floor = max(dev.time_floor() or 0.0, time_floor or 0.0)
        fetcher = DeadlineFetcher(timeout, file_deadline, started + deadline)
        try:
            updater = Updater(str(meta_dir), f"{base}/{METADATA_DIR}/", str(downloads), f"{base}/{TARGETS_DIR}/",
                              fetcher=fetcher, bootstrap=trust.read_bytes())
            _apply_time_floor(updater, floor)
            updater.refresh()
            info = updater.get_targetinfo(path)
        except EdgekitError:
            raise
        except Exception as e:  # network, HTTP, deadline, TUF verification, local metadata: all a refusal
            raise EdgekitError(f"update refused: repository metadata did not verify or could not be fetched "
                               f"({_why(e)}); {_serving(current)}") from None
        dev.raise_time_floor(max(floor, time.time()))  # a verified refresh: the clock may not go back past this
        base_result = {"task": task, "target": path, "backbone": identity.id, "backbone_sha256": identity.sha256,
                       "previous": current["version"] if current else None, "recovered": recovered}
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
        state = dev.read()
        if state.pinned and version != state.pinned:
            return {**base_result, "action": "none", "version": current["version"] if current else None,
                    "reason": f"pinned at {state.pinned} (edgekit update --unpin releases it); the repository "
                              f"offers {version}"}
        if version in state.blocked:
            raise BlockedVersionError(
                f"{version}, the newest the repository offers, is blocked on this device ({state.blocked[version]});"
                f" {_serving(current)}; edgekit update --allow {version} tries it again")

        shutil.rmtree(downloads, ignore_errors=True)
        downloads.mkdir()
        try:
            file = updater.download_target(info, filepath=str(downloads / f"{info.hashes['sha256']}.zip"))
        except Exception as e:
            shutil.rmtree(downloads, ignore_errors=True)
            raise EdgekitError(f"update refused: download of {path} {version} failed or did not verify "
                               f"({_why(e)}); {_serving(current)}") from None
        try:
            result = _try_version(file, dev, meta, identity, current, health, version)
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


def _try_version(file: str, dev, meta: dict, identity, current: Optional[dict], health: bool,
                 version: str) -> dict:
    """Verify the downloaded package, then the transaction: trial, health check, commit or fail (block)."""
    from edgekit.fleet.backbone import load_device_backbone
    from edgekit.fleet.health import check_health
    from edgekit.ota.install import check_version_folder, package_files
    from edgekit.ota.package import verify_package

    try:
        pkg = verify_package(file, _package_key(meta))
    except EdgekitError as e:
        raise EdgekitError(f"update refused: {e}; {_serving(current)}") from None
    if (pkg.manifest["task"], pkg.manifest["version"], pkg.manifest["backbone_sha256"]) != \
            (meta.get("task"), version, meta.get("backbone_sha256")):
        raise EdgekitError(f"update refused: the package is not the one its target metadata describes; "
                           f"{_serving(current)}")
    if pkg.manifest["backbone_sha256"] != identity.sha256:
        raise EdgekitError(f"update refused: the package fits backbone sha256 "
                           f"{pkg.manifest['backbone_sha256'][:16]}…, this device has {identity.sha256[:16]}…; "
                           f"{_serving(current)}")
    has_health = bool(health and pkg.manifest.get("health"))
    backbone = None
    if has_health:  # a device fault, not the version's: refused, not blocked
        try:
            backbone = load_device_backbone(identity)
        except EdgekitError as e:
            raise EdgekitError(f"update refused: {e}; {_serving(current)}") from None
        except Exception as e:  # noqa: BLE001 - a damaged artifact must not end in "internal error"
            raise EdgekitError(f"update refused: the device's backbone {identity.ref} could not be loaded "
                               f"({_why(e)}); {_serving(current)}") from None
    with dev.lock():
        rel_dir = dev.add_version(version, package_files(pkg),
                                  lambda folder: check_version_folder(folder, pkg.manifest))
        dev.begin_trial(rel_dir, version, pkg.signer.key_id)
        h = None
        if has_health:
            try:
                h = check_health(dev.path / rel_dir, backbone)
            except Exception as e:  # noqa: BLE001 - fails closed, whatever check_health let through
                h = {"ok": False, "reason": f"{type(e).__name__} while running the health check"}
            if not h["ok"]:
                reason = f"health check failed: {h['reason']}"
                dev.fail(version, reason)
                raise EdgekitError(f"health check of {version} failed ({h['reason']}); {version} is blocked on this "
                                   f"device; {_serving(current)}")
        state = dev.commit(version)
    return {"action": "installed", "version": version, "path": str(dev.folder(state.current)), "health": h}
