"""The device side: ``edgekit update``, one safe run from cron or a systemd timer.

1. Lock ROOT/tuf/update.lock (a second run at the same time is refused at once, with one line), then recover a
   stale trial left by a run that was killed during its health check (``InstallRoot.recover``), and apply the
   operator's acts given with this run (``--allow``, ``--pin``, ``--unpin``).
2. TUF refresh with python-tuf's ``ngclient.Updater``: the trust anchor is the device's trust bundle
   (``--trust BUNDLE``, ``edgekit.ota.trust``: the repository's root at provisioning, plus its timestamp and
   snapshot, seeded into ROOT/tuf/metadata on the first run so that a fresh device already refuses older
   ones); the newest trusted metadata is kept in ROOT/tuf/metadata, so a replayed old timestamp or snapshot, an expired one, metadata signed by a
   revoked key or by too few root keys, and mix-and-match are refused by TUF. Liveness: every request has a
   per-read timeout (``--timeout``) and every file and the whole run a total deadline (``--file-deadline``,
   ``--deadline``; ``edgekit.fleet.fetch``), TUF's slow-retrieval defence. Time: expiry is judged against
   max(device clock, the time floor), the floor being the highest time seen at a verified refresh (persisted in
   ROOT/tuf/trusted-time.json), the trust bundle's issue time, or given by the caller (``time_floor``), so a
   clock set back does not bring an expired timestamp back to life (TUF's freeze-attack defence needs a clock
   that does not go back; Uptane's deployment best practices ask for a secure source of time).
3. The device's adapter: one target path per task and backbone (``repository.target_path``); nothing to
   do when it is not newer than the version in service, when the device is pinned to another version, or when
   it is blocked (it failed its check, was interrupted twice, or was rolled back): the latter exits 3 with one
   line, so monitoring sees a bad version that stays published. ``--backbone repo:NAME`` first fetches the
   backbone itself the same way (target ``backbones/NAME.zip``) and installs it under ROOT/backbones/.
4. Download (TUF checks length and sha256 before anything else sees it), then the package's own
   verification against the keys the device's trust bundle scopes to this task (never a key named by the
   repository's metadata: two independent authorities must agree), the package's task, version and backbone
   against what the device asked for, then the transaction (``edgekit.device.state``): the version is staged
   and recorded as a TRIAL, never pointed to by ROOT/current; the health check (``edgekit.fleet.health``) runs on
   the trial folder; only when it passes is ROOT/current switched to it (the commit). A failed check (of any
   kind: ``check_health`` fails closed, and any exception around it is a failure too) discards the trial and
   blocks the version. Any interruption (kill -9, power loss) leaves the previous committed version serving.
5. Canary hold. When the install root has a canary policy (``edgekit station ROOT --canary N``, recorded by
   ``InstallRoot.set_canary_policy``) and the adapter comes on the backbone already deployed, a trial that passed
   its health check (or ran without one, ``--no-health-check``) is not committed: ``InstallRoot.hold_for_canary``
   keeps it a trial (trial["phase"] = "canary"; ROOT/current unchanged, so it does not serve and ``classify
   --adapters ROOT`` keeps running the committed version) and the run returns action "trial". The station runs it
   in shadow on live images and commits (promote) or fails (reject, blocked) it; while a trial is held, ``update``
   installs nothing new and says which version waits and how to end it (``edgekit station promote|reject``).
   Which guarantee comes from where: the uncommitted-until-told split is Mender's (an update is final only at
   ArtifactCommit) and RAUC's (mark-good / mark-bad of a slot); neither gates on model quality (Mender's phased
   rollout stops on install failures only), and Uptane and TUF say nothing about canaries: the live-image gate
   itself is edgekit's (``edgekit.station.canary``).

Refusals before step 4 leave the install root as it was (only ROOT/tuf, TUF's own trusted state and the time
floor, may advance) and the current version serving.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from edgekit.errors import EdgekitError
from edgekit.utils import atomic_write

STATE_DIR = "tuf"
BACKBONES_DIR = "backbones"  # ROOT/backbones/NAME-VERSION/: backbone artifacts fetched with --backbone repo:NAME
REPO_PREFIX = "repo:"
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
    lock = state_dir / LOCK_NAME
    try:  # O_NOFOLLOW: a symlink planted at the lock's place is not followed (and not created through)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        raise EdgekitError(f"cannot open the update lock {lock} ({e.strerror or e}); move away what is there") \
            from None
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

    ``trust``: the device's trust bundle (``edgekit.ota.trust``); ``backbone``: an artifact folder, weights file,
    name, or ``repo:NAME`` to fetch the backbone from the repository;
    ``allow``: unblock that version first; ``pin`` / ``unpin``: hold the device at a version / release it;
    ``time_floor`` (seconds since the epoch): expiry is judged at no earlier time than this (the trust bundle's
    issue time always counts); ``deadline`` / ``file_deadline``: seconds for all downloads of the run / for one file.
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
    from edgekit.mlff.names import check_name
    from edgekit.mlff.version import parse_version
    from edgekit.ota.trust import load_bundle

    root = Path(root)
    bundle = load_bundle(trust)
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
    if task is not None:
        check_name(task, "--task")
    backbone_from_repo = backbone[len(REPO_PREFIX):] if backbone and backbone.startswith(REPO_PREFIX) else None
    if backbone_from_repo is not None:
        check_name(backbone_from_repo, "--backbone repo: name")
    # before anything is written
    identity = resolve_backbone(backbone) if backbone and backbone_from_repo is None else None
    if identity is None and backbone_from_repo is None and read_device_backbone(root) is None:
        raise EdgekitError(f"no backbone recorded in {root}; give --backbone ARTIFACT|CKPT|NAME")
    if task is None and installed(root) is None:
        raise EdgekitError(f"no adapter installed at {root} yet; give --task")
    dev = InstallRoot(root)
    state_dir = root / STATE_DIR
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgekitError(f"cannot create {state_dir} ({e.strerror or e}); move away what is there") from None
    with _update_lock(state_dir):
        recovered = dev.recover()  # a trial left by a killed run: discarded, counted
        dev.tidy()  # and whatever else a killed run left (a staging folder, a temp record)
        if allow:
            dev.allow(allow)
        if unpin:
            dev.pin(None)
        if pin:
            dev.pin(pin)
        held = dev.read().held
        if held is not None:
            # one trial at a time: a version on canary hold is judged by the station (or the operator) before any
            # other is fetched, so a verdict is never about a version that has since been replaced
            cur = installed(root)
            return {"task": task or (cur["task"] if cur else None), "action": "none",
                    "version": cur["version"] if cur else None, "trial": held["version"],
                    "previous": cur["version"] if cur else None, "recovered": recovered,
                    "reason": f"{held['version']} is on canary hold since {held.get('held', '?')} (a station decides "
                              f"on live images); nothing new is installed until it is promoted or rejected: edgekit "
                              f"station promote|reject {root}"}
        recorded = read_device_backbone(root)
        identity = identity or (recorded if backbone_from_repo is None else None)
        if identity is None and backbone_from_repo is None:
            raise EdgekitError(f"no backbone recorded in {root}; give --backbone ARTIFACT|CKPT|NAME")
        current = installed(root)
        task = task or (current["task"] if current else None)
        if not task:
            raise EdgekitError(f"no adapter installed at {root} yet; give --task")
        if current and task != current["task"]:
            raise EdgekitError(f"--task {task}: the adapter in service is for task {current['task']}")
        adapter_keys = bundle.require_keys_for("adapter", task)  # refused before anything is fetched

        base = repo_url.rstrip("/")
        meta_dir, downloads = state_dir / "metadata", state_dir / "downloads"
        meta_dir.mkdir(exist_ok=True)
        _seed_metadata(meta_dir, bundle)
        floor = max(dev.time_floor() or 0.0, time_floor or 0.0, bundle.issued.timestamp())
        fetcher = DeadlineFetcher(timeout, file_deadline, started + deadline)
        try:
            updater = Updater(str(meta_dir), f"{base}/{METADATA_DIR}/", str(downloads), f"{base}/{TARGETS_DIR}/",
                              fetcher=fetcher, bootstrap=bundle.root)
            _apply_time_floor(updater, floor)
            updater.refresh()
        except EdgekitError:
            raise
        except Exception as e:  # network, HTTP, deadline, TUF verification, local metadata: all a refusal
            raise EdgekitError(f"update refused: repository metadata did not verify or could not be fetched "
                               f"({_why(e)}); {_serving(current)}") from None
        dev.raise_time_floor(max(floor, time.time()))  # a verified refresh: the clock may not go back past this
        if backbone_from_repo is not None:
            identity = _fetch_backbone(updater, bundle, backbone_from_repo, root, downloads, current)
        path = target_path(task, identity.sha256)
        try:
            info = updater.get_targetinfo(path)
        except Exception as e:
            raise EdgekitError(f"update refused: repository metadata did not verify or could not be fetched "
                               f"({_why(e)}); {_serving(current)}") from None
        base_result = {"task": task, "target": path, "backbone": identity.id, "backbone_sha256": identity.sha256,
                       "previous": current["version"] if current else None, "recovered": recovered}
        # The device's backbone record moves only together with an adapter that fits it: at once when the adapter
        # in service (if any) already does, else in the same locked step as the commit of an adapter trained on
        # it. Recording it first left a device pairing the adapter in service with a backbone it was never trained
        # on, reported as "up to date" (a wrong model that stays unnoticed).
        pending_backbone = identity if backbone and identity != recorded else None
        if pending_backbone and (current is None or current.get("backbone_sha256") == identity.sha256):
            record_device_backbone(root, identity)  # the device's backbone, as given: fetching worked
            pending_backbone = None

        def nothing_to_install(reason: str) -> dict:
            # never "up to date" while the adapter in service does not fit the device's backbone: a new one not
            # yet recorded, or a recorded one left by a run cut between the record and its adapter's commit
            if current is not None and current.get("backbone_sha256") != identity.sha256:
                keeps = (f"the device keeps its backbone {recorded.id if recorded else '(unrecorded)'} until an "
                         f"adapter for {identity.id} can be installed" if pending_backbone is not None else
                         f"the device's recorded backbone does not fit the adapter in service")
                raise EdgekitError(f"update refused: {reason}, and the adapter in service ({task} {current['version']}) "
                                   f"was trained on another backbone than {identity.id} ({identity.sha256[:16]}…); "
                                   f"{keeps}; {_serving(current)}")
            return {**base_result, "action": "none", "version": current["version"] if current else None,
                    "reason": reason}

        if info is None:
            return nothing_to_install(f"the repository has no adapter for task {task} on backbone {identity.id}")
        meta = (info.custom or {}).get("edgekit") if isinstance(info.custom, dict) else None
        if not isinstance(meta, dict):
            raise EdgekitError(f"update refused: target {path} has no edgekit metadata; {_serving(current)}")
        version = meta.get("version")
        parse_version(version)
        if current and parse_version(version) <= parse_version(current["version"]):
            return nothing_to_install(f"{current['version']} is the newest for this task and backbone")
        state = dev.read()
        if state.pinned and version != state.pinned:
            return nothing_to_install(f"pinned at {state.pinned} (edgekit update --unpin releases it); the "
                                      f"repository offers {version}")
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
            result = _try_version(file, dev, identity, current, health, version, adapter_keys, task,
                                  record_backbone=pending_backbone is not None)
        finally:
            shutil.rmtree(downloads, ignore_errors=True)
        return {**base_result, **result}


def _seed_metadata(meta_dir: Path, bundle) -> None:
    """A device's first run starts from the metadata its trust bundle was provisioned with (TUF then refuses
    any older timestamp or snapshot version); later runs keep their own newer trusted copies."""
    if (meta_dir / "timestamp.json").exists():
        return
    for role, data in bundle.seeds.items():
        with atomic_write(meta_dir / f"{role}.json") as f:
            f.write(data)


def _authorize(pkg, task: str, identity, version: str, current: Optional[dict]) -> None:
    """The package is what this device asked for: its task, its backbone, the version TUF named. (The seal was
    checked against the trust bundle's keys for this task.)"""
    m = pkg.manifest
    for what, got, want in (("task", m.get("task"), task), ("backbone", m.get("backbone_sha256"), identity.sha256),
                            ("version", m.get("version"), version)):
        if got != want:
            shown = (got or "")[:16] + "…" if what == "backbone" else got
            raise EdgekitError(f"update refused: the package is for {what} {shown}, this device needs "
                               f"{want[:16] + '…' if what == 'backbone' else want}; {_serving(current)}")


def _fetch_backbone(updater, bundle, name: str, root: Path, downloads: Path, current: Optional[dict]):
    """Download, verify (TUF, then the trust bundle's keys for this backbone name) and install the backbone
    package ``backbones/NAME.zip`` under ROOT/backbones/NAME-VERSION/; record it as the device's backbone."""
    from edgekit.fleet.backbone import read_device_backbone, resolve_backbone
    from edgekit.fleet.repository import backbone_target_path
    from edgekit.mlff.version import parse_version
    from edgekit.ota.package import BACKBONE_KIND, BACKBONE_MAX_SIZE, verify_package

    path = backbone_target_path(name)
    keys = bundle.require_keys_for("backbone", name)
    try:
        info = updater.get_targetinfo(path)
    except Exception as e:
        raise EdgekitError(f"update refused: repository metadata did not verify ({_why(e)}); {_serving(current)}") \
            from None
    if info is None:
        raise EdgekitError(f"update refused: the repository has no backbone {name} ({path}); {_serving(current)}")
    meta = (info.custom or {}).get("edgekit") if isinstance(info.custom, dict) else None
    version = meta.get("version") if isinstance(meta, dict) else None
    try:
        parse_version(version)
    except EdgekitError as e:
        raise EdgekitError(f"update refused: target {path}: {e}; {_serving(current)}") from None
    recorded = read_device_backbone(root)
    if recorded is not None and recorded.id == name and recorded.version is not None \
            and parse_version(version) < parse_version(recorded.version):
        # the rollback counter of the backbone (Uptane): whoever holds the targets key may name an older, validly
        # sealed backbone package; TUF's rollback protection covers the metadata, not this choice
        raise EdgekitError(f"update refused: the repository offers backbone {name} {version}, older than the "
                           f"{recorded.version} this device has installed; {_serving(current)}")
    shutil.rmtree(downloads, ignore_errors=True)
    downloads.mkdir()
    try:
        try:
            file = updater.download_target(info, filepath=str(downloads / f"{info.hashes['sha256']}.zip"))
        except Exception as e:
            raise EdgekitError(f"update refused: download of {path} failed or did not verify ({_why(e)}); "
                               f"{_serving(current)}") from None
        try:
            pkg = verify_package(file, keys, max_size=BACKBONE_MAX_SIZE, kind=BACKBONE_KIND)
        except EdgekitError as e:
            raise EdgekitError(f"update refused: {e}; {_serving(current)}") from None
        if (pkg.manifest["backbone"], pkg.manifest["version"]) != (name, version):
            raise EdgekitError(f"update refused: the package is not the backbone its target metadata describes; "
                               f"{_serving(current)}")
        folder = _install_backbone(pkg, root)
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
    identity = replace(resolve_backbone(folder), version=version)  # the artifact's manifest and files, as installed
    if identity.sha256 != pkg.manifest["backbone_sha256"]:
        raise EdgekitError(f"update refused: backbone {name} {version} records another backbone_sha256 than its "
                           f"package; {_serving(current)}")
    return identity


def _install_backbone(pkg, root: Path) -> Path:
    """ROOT/backbones/NAME-VERSION/ from a verified backbone package: staged, fsynced, renamed into place
    (an existing folder of the same version is kept when it holds the same files)."""
    base = root / BACKBONES_DIR
    folder = base / f"{pkg.manifest['backbone']}-{pkg.manifest['version']}"
    if folder.is_dir():
        if all((folder / n).is_file() and (folder / n).read_bytes() == d for n, d in pkg.files.items()):
            return folder
        raise EdgekitError(f"update refused: {folder} exists with other contents; remove it to re-fetch")
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=base))
    try:
        for n, d in pkg.files.items():
            with open(staging / n, "wb") as f:
                f.write(d)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(staging / n, 0o444)
        os.chmod(staging, 0o755)
        os.rename(staging, folder)
        fd = os.open(base, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _try_version(file: str, dev, identity, current: Optional[dict], health: bool, version: str, keys: dict,
                 task: str, record_backbone: bool = False) -> dict:
    """Verify the downloaded package, then the transaction: trial, health check, commit or fail (block)."""
    from edgekit.fleet.backbone import load_device_backbone
    from edgekit.fleet.health import check_health
    from edgekit.mlff.version import parse_version
    from edgekit.ota.install import check_version_folder, package_files
    from edgekit.ota.package import verify_package

    try:
        pkg = verify_package(file, keys)
    except EdgekitError as e:
        raise EdgekitError(f"update refused: {e}; {_serving(current)}") from None
    _authorize(pkg, task, identity, version, current)
    if health and not pkg.manifest.get("health"):
        # nothing could show that this adapter behaves on this device: refused unless the operator says so
        raise EdgekitError(f"update refused: {task} {version} carries no health-check samples (edgekit package "
                           f"--samples); run with --no-health-check to install it unchecked; {_serving(current)}")
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
        # again under the lock: what was decided before the download (newer than what serves, not blocked, not
        # pinned elsewhere) may have changed since, by an operator's install or rollback that does not wait for
        # the update lock; committing anyway would downgrade a version installed meanwhile
        now = dev.read()
        if now.current and parse_version(version) <= parse_version(now.current["version"]):
            return {"action": "none", "version": now.current["version"],
                    "reason": f"{now.current['version']} is in service (installed while {version} downloaded), and "
                              f"{version} is not newer"}
        if version in now.blocked:
            raise BlockedVersionError(f"{version} was blocked on this device while it downloaded "
                                      f"({now.blocked[version]}); nothing installed")
        if now.pinned and version != now.pinned:
            return {"action": "none", "version": now.current["version"] if now.current else None,
                    "reason": f"pinned at {now.pinned} (while {version} downloaded)"}
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
        if now.canary is not None and not record_backbone:
            # the root's canary policy: the trial stays a trial (ROOT/current unchanged) until a station has run it
            # in shadow on live images beside the serving adapter, on the same backbone features; a new backbone
            # cannot be shadowed that way, so an adapter that comes with one is committed on its health check alone
            state = dev.hold_for_canary(version, h)
            n, a = now.canary["images"], now.canary["min_agreement"]
            return {"action": "trial", "version": version, "path": str(dev.folder(state.trial)), "health": h,
                    "canary": now.canary,
                    "reason": f"{version} is on canary hold: {_serving(now.current)}; a station running on "
                              f"{dev.path} promotes it after {n} live images if it agrees with the serving adapter "
                              f"on at least {a:.0%} of them (edgekit station promote|reject {dev.path} decides by "
                              f"hand)"}
        if record_backbone:  # the new backbone and the adapter that passed its check on it, in one locked step
            from edgekit.fleet.backbone import record_device_backbone

            record_device_backbone(dev.path, identity)
        state = dev.commit(version)
    return {"action": "installed", "version": version, "path": str(dev.folder(state.current)), "health": h}
