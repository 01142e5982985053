"""One owner for an install root's state: what a device serves, tries, refuses and trusts.

Install root layout (ROOT)::

    ROOT/versions/<version>/      version folders (files read-only): the committed one in service, the previous
                                  one kept for rollback, and at most one trial. A version installed again while its
                                  folder is still kept goes to versions/<version>~2, ~3, ...
    ROOT/current -> versions/<v>  relative symlink: the COMMITTED version in service, the only one a runtime loads
    ROOT/state.json               {"format": "edgekit-ota-state", "format_version": 2,
                                   "current": {"version", "dir"} | null, "previous": ... | null,
                                   "trial": {"version", "dir", "started"[, "phase": "canary", "held",
                                             "health"]} | null,
                                   "blocked": {version: reason}, "interrupted": {version: count},
                                   "pinned": version | null,
                                   "canary": {"images", "min_agreement", "max_confidence_drop"} | null,
                                   "history": [{"time", "action", "version", ...}]}
    ROOT/backbone.json            the deployed backbone (id, backbone_sha256, ref, kind): ``record_backbone``
    ROOT/backbone.sha256          optional, written by whoever deploys the backbone (its first word)
    ROOT/tuf/trusted-time.json    the time floor: the highest time seen at a verified repository refresh
    ROOT/.staging-*, .current-*   an install in progress (or a crashed one, removed by the next transition)

States of a version and the transitions (each a method of ``InstallRoot``; every writer holds the flock on ROOT):

* ``add_version``: package files written to ROOT/.staging-*, fsynced, checked, renamed into versions/. Not yet
  referenced by anything: a crash leaves an orphan folder that the next transition removes.
* ``begin_trial`` -> TRIAL: state.json records the trial (fsync) *before* its health check runs. A trial is never
  pointed to by ROOT/current, so it never serves (Mender: an update stays uncommitted until ArtifactCommit).
* ``commit`` -> COMMITTED: the one atomic switch of ROOT/current (a new symlink ``os.replace``d over the old one,
  fsync of ROOT), then the state write. A crash between the two is reconciled on read: ROOT/current pointing at
  the recorded trial means it was committed (only a trial that passed its check is ever switched to).
* ``fail`` -> BLOCKED: the trial is discarded and its version goes on the block list with the reason (RAUC's
  mark-bad); ``update`` never installs a blocked version by itself again.
* ``hold_for_canary`` -> CANARY HOLD: a trial that passed its health check on a root with a canary policy
  (``set_canary_policy``, recorded by ``edgekit station --canary N``) is not committed by ``update``: trial["phase"]
  becomes "canary" and it waits, still a trial (ROOT/current unchanged: it never serves), for a station to run it in
  shadow on live images (``edgekit.station.canary``). The verdict is one of the two transitions above: ``commit``
  (promote) or ``fail`` with the reason (reject, blocked), each in the history with its reason; ``edgekit station
  promote|reject`` are the operator's override. Where each guarantee comes from: Mender keeps an update
  uncommitted until ArtifactCommit, and an uncommitted update is rolled back; RAUC's mark-good / mark-bad are the
  verdict a health service gives a slot. Both describe the commit/reject split this hold reuses, not what decides it:
  Mender's phased rollouts stop only on install failures, and Uptane (like TUF) says nothing about canaries or model
  quality at all; the gate on live images (agreement with the serving adapter) is edgekit's own.
* ``tidy``: removes what an interrupted transition left (staging folders, temp links, temp records, orphans).
* ``recover``: a trial found with no process holding the lock was interrupted (kill -9, power loss). The first
  interruption of a version is forgiven (the next ``update`` retries it); the second blocks it, so a version that
  kills its checker every time cannot loop (RAUC's boot-attempt counter, BOOT_x_LEFT, in spirit). A trial on
  canary hold is left alone: its check finished and passed, and it is waiting for a station, not interrupted.
* ``rollback``: ROOT/current back to the previous version; the version rolled back from is blocked (an operator's
  rollback is a verdict on it), the one rolled back to unblocked.
* ``allow`` (unblock), ``pin`` / ``unpin``: explicit operator acts, recorded in the history.
* ``commit_install``: ``edgekit install`` (an operator installing a file by hand) puts a version straight in service.
* ``record_backbone`` / ``read_backbone`` / ``backbone_sha256``: the device's backbone record.
* ``time_floor`` / ``raise_time_floor``: the freeze defence's persisted clock (see ``edgekit.fleet.update``).

This module imports only the base modules, so every layer (ota, fleet, runtime, a station) can call it.
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
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

from edgekit.errors import EdgekitError
from edgekit.utils import atomic_write

STATE_NAME = "state.json"
STATE_FORMAT = "edgekit-ota-state"
STATE_FORMAT_VERSION = 2  # 1: current, previous, history only (read as a state with nothing blocked)
CURRENT_LINK = "current"
VERSIONS_DIR = "versions"
BACKBONE_FILE = "backbone.sha256"
DEVICE_BACKBONE_FILE = "backbone.json"
TRUSTED_TIME_FILE = "tuf/trusted-time.json"
VERSION_MANIFEST = "manifest.json"  # the package manifest inside a version folder (edgekit.ota.package)
STAGING_PREFIX = ".staging-"
LINK_TMP_PREFIX = ".current-"
HISTORY_KEPT = 100
CANARY_PHASE = "canary"  # trial["phase"] of a trial held for a station's canary
DEFAULT_MAX_CONFIDENCE_DROP = 0.02  # a trial's mean top-1 probability may be this much below the serving one's
MAX_TRIAL_INTERRUPTIONS = 2  # the second interrupted health check of a version blocks it
_VERSION_DIR_RE = re.compile(r"^versions/[0-9]+\.[0-9]+\.[0-9]+(~[0-9]+)?\Z")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def os_error_text(e: OSError) -> str:
    return f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)


@dataclass
class DeviceState:
    """The recorded state; version entries are {"version", "dir"} (a trial also has "started")."""

    current: Optional[dict] = None
    previous: Optional[dict] = None
    trial: Optional[dict] = None
    blocked: Dict[str, str] = field(default_factory=dict)
    interrupted: Dict[str, int] = field(default_factory=dict)
    pinned: Optional[str] = None
    history: List[dict] = field(default_factory=list)
    canary: Optional[dict] = None  # the canary policy: {"images", "min_agreement", "max_confidence_drop"}

    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION, "current": self.current,
                "previous": self.previous, "trial": self.trial, "blocked": dict(self.blocked),
                "interrupted": dict(self.interrupted), "pinned": self.pinned, "canary": self.canary,
                "history": self.history[-HISTORY_KEPT:]}

    @property
    def held(self) -> Optional[dict]:
        """The trial on canary hold (its health check passed; a station decides), or None."""
        return self.trial if self.trial and self.trial.get("phase") == CANARY_PHASE else None

    def log(self, action: str, version: Optional[str], **extra) -> None:
        self.history.append({"time": utc_now(), "action": action, "version": version,
                             **{k: v for k, v in extra.items() if v is not None}})


# --- small filesystem helpers -------------------------------------------------------------

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


def _write_state(root: Path, state: DeviceState) -> None:
    with atomic_write(root / STATE_NAME, "w") as f:
        os.fchmod(f.fileno(), 0o644)  # readable by a runtime running as another user
        json.dump(state.to_json(), f, indent=2)
        f.write("\n")
    _fsync_dir(root)


def _short(value, limit: int = 60) -> str:
    """A JSON value as short one-line text for an error message."""
    text = " ".join(json.dumps(value, default=str).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _parse_state(path: Path) -> DeviceState:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EdgekitError(f"{path} is unreadable ({e}); fix or remove it") from None
    if not isinstance(d, dict) or d.get("format") != STATE_FORMAT or d.get("format_version", 1) not in (1, 2):
        raise EdgekitError(f"{path} is not an edgekit install state; fix or remove it")

    def entry(name, v):
        if v is None:
            return None
        if not (isinstance(v, dict) and isinstance(v.get("version"), str) and isinstance(v.get("dir"), str)):
            # fail closed: read as "nothing recorded", a corrupt entry let read() take whatever ROOT/current
            # points to and report it as a healthy state (station status did); what serves is never guessed
            raise EdgekitError(f"{path} is malformed ({name} is {_short(v)}, not a version entry "
                               "{\"version\", \"dir\"}); fix or remove it")
        if not _VERSION_DIR_RE.match(v["dir"]):  # the rule ROOT/current's target obeys: never a path out of ROOT
            raise EdgekitError(f"{path} is malformed (a version folder {v['dir']!r} outside "
                               f"{VERSIONS_DIR}/); fix or remove it")
        return v

    blocked = d.get("blocked") or {}
    interrupted = d.get("interrupted") or {}
    if not isinstance(blocked, dict) or not isinstance(interrupted, dict):
        raise EdgekitError(f"{path} is malformed (blocked / interrupted); fix or remove it")
    pinned, history = d.get("pinned"), d.get("history")
    # fail closed here too: a corrupt pin read as "not pinned" let update install over the operator's hold, and a
    # history that is no list was an internal error (a number) or split into characters (a string)
    if pinned is not None and not (isinstance(pinned, str) and pinned):
        raise EdgekitError(f"{path} is malformed (pinned is {_short(pinned)}, not a version); fix or remove it")
    if history is not None and not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        raise EdgekitError(f"{path} is malformed (history is {_short(history)}, not a list of records); "
                           "fix or remove it")
    canary = d.get("canary")
    if canary is not None:
        try:
            canary = check_canary_policy(canary)
        except EdgekitError as e:
            raise EdgekitError(f"{path} is malformed (canary policy: {e}); fix or remove it") from None
    return DeviceState(entry("current", d.get("current")), entry("previous", d.get("previous")),
                       entry("trial", d.get("trial")),
                       {str(k): str(v) for k, v in blocked.items()},
                       {str(k): int(v) for k, v in interrupted.items() if isinstance(v, int)},
                       pinned, list(history or []), canary)


def check_canary_policy(policy) -> dict:
    """A canary policy, checked: {"images": N >= 1, "min_agreement": A in [0, 1], "max_confidence_drop": D in
    [0, 1]}; EdgekitError names what is wrong."""
    if not isinstance(policy, dict):
        raise EdgekitError("a canary policy is an object {images, min_agreement, max_confidence_drop}")
    n, a = policy.get("images"), policy.get("min_agreement")
    d = policy.get("max_confidence_drop", DEFAULT_MAX_CONFIDENCE_DROP)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10_000_000:
        raise EdgekitError(f"canary images must be a whole number of at least 1, not {n!r}")
    for name, v in (("min_agreement", a), ("max_confidence_drop", d)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= float(v) <= 1.0:
            raise EdgekitError(f"canary {name} must be a number in [0, 1], not {v!r}")
    return {"images": n, "min_agreement": float(a), "max_confidence_drop": float(d)}


def _is_temp_record(name: str) -> bool:
    """An ``atomic_write`` temp file of one of ROOT's records (``.state.json.<random>.tmp``)."""
    return name.endswith(".tmp") and name.startswith((f".{STATE_NAME}.", f".{DEVICE_BACKBONE_FILE}."))


class InstallRoot:
    """An install root and its state machine. Reading needs no lock; every transition takes the flock on ROOT
    (re-entrant within this object, so a caller can hold it across several transitions, e.g. trial -> check ->
    commit)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: Optional[int] = None
        self._lock_depth = 0
        if self.path.exists() and not self.path.is_dir():
            raise EdgekitError(f"install root {self.path} is not a folder")

    # --- the lock ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, create: bool = True):
        """An exclusive flock on the ROOT folder itself (no lock file, so nothing is left in ROOT); released by the
        kernel when the process dies, which is how ``recover`` tells a stale trial from one being checked."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield self
            finally:
                self._lock_depth -= 1
            return
        if create:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise EdgekitError(f"cannot create install root {self.path}: {os_error_text(e)}") from None
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise EdgekitError(f"another install, update or rollback is working on {self.path}; try again") \
                    from None
            self._lock_fd, self._lock_depth = fd, 1
            yield self
        finally:
            self._lock_fd, self._lock_depth = None, 0
            os.close(fd)  # releases the lock

    def _require_lock(self) -> None:
        if not self._lock_depth:
            raise RuntimeError("a state transition without the install root's lock")

    # --- reading -------------------------------------------------------------------------------------------------

    def _current_link(self) -> Optional[str]:
        """The ``versions/<name>`` that ROOT/current points to, or None when nothing is in service."""
        link = self.path / CURRENT_LINK
        if not link.is_symlink():
            if link.exists():
                raise EdgekitError(f"{link} is not a symlink; edgekit did not make it, move it away")
            return None
        target = os.readlink(link)
        if not _VERSION_DIR_RE.match(target) or not (self.path / target).is_dir():
            raise EdgekitError(f"{link} points to {target!r}, not to a version folder in {self.path / VERSIONS_DIR}")
        return target

    def _version_of_dir(self, rel_dir: str) -> str:
        try:
            return json.loads((self.path / rel_dir / VERSION_MANIFEST).read_text(encoding="utf-8"))["version"]
        except (OSError, ValueError, KeyError, TypeError):
            return Path(rel_dir).name.split("~")[0]

    def read(self) -> DeviceState:
        """The state, reconciled with ROOT/current (the truth for what serves: the switch is the commit point)."""
        if not self.path.is_dir():
            return DeviceState()
        state_path = self.path / STATE_NAME
        state = _parse_state(state_path) if state_path.is_file() else DeviceState()
        active = self._current_link()
        if active is None:
            state.current = state.previous = None
            return state
        if state.current is None or state.current.get("dir") != active:
            if state.trial is not None and state.trial.get("dir") == active:
                # the commit's switch happened, its state write did not: the trial passed its check
                version = state.trial["version"]
                state.previous, state.current, state.trial = state.current, {"version": version, "dir": active}, None
                state.interrupted.pop(version, None)
            elif state.previous is not None and state.previous.get("dir") == active:
                # a rollback's switch, its state write cut short: only ``rollback`` switches back to the kept
                # previous folder (installs and commits always switch to a new folder), so the version switched
                # away from was rolled back and stays blocked, as the completed rollback would have recorded
                back, away = state.previous, state.current
                state.current, state.previous = back, away
                if away is not None:
                    state.blocked.setdefault(away["version"], "rolled back by the operator")
                state.blocked.pop(back["version"], None)
            else:  # a direct install's switch, unrecorded
                state.previous = state.current
                state.current = {"version": self._version_of_dir(active), "dir": active}
        return state

    def folder(self, entry: Optional[dict]) -> Optional[Path]:
        return (self.path / entry["dir"]).resolve() if entry else None

    def serving(self) -> Optional[dict]:
        """The committed version in service: {"version", "dir", "path"}, or None."""
        cur = self.read().current
        return {**cur, "path": str(self.folder(cur))} if cur else None

    def time_floor(self) -> Optional[float]:
        """The persisted time floor (seconds since the epoch), or None."""
        path = self.path / TRUSTED_TIME_FILE
        if not path.is_file():
            return None
        try:
            value = float(json.loads(path.read_text(encoding="utf-8"))["time_floor"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EdgekitError(f"{path} is unreadable ({e}); fix or remove it") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise EdgekitError(f"{path} holds no finite time; fix or remove it")
        return value

    # --- the backbone record -------------------------------------------------------------------------------------

    def read_backbone(self) -> Optional[dict]:
        """ROOT/backbone.json as a dict (backbone, backbone_sha256, ref, kind, and version when it came from the
        repository), or None."""
        path = self.path / DEVICE_BACKBONE_FILE
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            record = {k: d[k] for k in ("backbone", "backbone_sha256", "ref", "kind")}
            if "version" in d:  # a backbone installed from the repository: its package version
                record["version"] = d["version"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EdgekitError(f"{path} is unreadable ({e}); fix it or give --backbone") from None
        if not (isinstance(record["backbone_sha256"], str) and _SHA256_RE.match(record["backbone_sha256"])) \
                or record["kind"] not in ("artifact", "weights") or not isinstance(record.get("version", ""), str):
            raise EdgekitError(f"{path} is malformed; fix it or give --backbone")
        return record

    def record_backbone(self, record: Mapping) -> None:
        """Write ROOT/backbone.json (what ``edgekit install`` and ``edgekit update`` check packages against)."""
        with atomic_write(self.path / DEVICE_BACKBONE_FILE, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            json.dump(dict(record), f, indent=2)
            f.write("\n")

    def backbone_sha256(self, override: Optional[str] = None) -> Optional[str]:
        """The device's backbone sha256: ``override`` (--backbone-sha256), else ROOT/backbone.json, else
        ROOT/backbone.sha256, else None."""
        if override is not None:
            value = override.strip().lower()
            if not _SHA256_RE.match(value):
                raise EdgekitError(f"--backbone-sha256 {override!r} is not a sha256 (64 hex digits)")
            return value
        if (self.path / DEVICE_BACKBONE_FILE).is_file():
            try:
                return self.read_backbone()["backbone_sha256"]
            except EdgekitError:
                raise EdgekitError(f"{self.path / DEVICE_BACKBONE_FILE} has no valid backbone_sha256; fix or "
                                   "remove it") from None
        path = self.path / BACKBONE_FILE
        if not path.is_file():
            return None
        words = path.read_text(encoding="utf-8", errors="replace").split()
        value = words[0].lower() if words else ""
        if not _SHA256_RE.match(value):
            raise EdgekitError(f"{path} does not start with a sha256 (64 hex digits)")
        return value

    # --- writing helpers -----------------------------------------------------------------------------------------

    def _save(self, state: DeviceState, what: str) -> None:
        try:
            _write_state(self.path, state)
        except OSError as e:
            raise EdgekitError(f"{what}, but {self.path / STATE_NAME} could not be updated ({os_error_text(e)}); "
                               "it is reconciled on the next transition") from e

    def _switch_current(self, rel_dir: str) -> None:
        """Point ROOT/current at ``rel_dir`` atomically: a new symlink renamed over the old one, then fsync."""
        tmp = self.path / f"{LINK_TMP_PREFIX}{secrets.token_hex(6)}"
        os.symlink(rel_dir, tmp)
        try:
            os.replace(tmp, self.path / CURRENT_LINK)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.path)

    def remove_leftovers(self, state: Optional[DeviceState] = None) -> None:
        """Crashed stagings, stray temp links, and version folders neither serving, kept for rollback nor on trial."""
        self._require_lock()
        state = state or self.read()
        keep = {e["dir"] for e in (state.current, state.previous, state.trial) if e}
        for entry in self.path.iterdir():
            if entry.name.startswith(LINK_TMP_PREFIX) and entry.is_symlink():
                with contextlib.suppress(OSError):
                    entry.unlink()
            elif _is_temp_record(entry.name) and entry.is_file() and not entry.is_symlink():
                with contextlib.suppress(OSError):
                    entry.unlink()  # an atomic_write of state.json / backbone.json cut short
            elif entry.name.startswith(STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
        versions = self.path / VERSIONS_DIR
        if versions.is_dir():
            for entry in versions.iterdir():
                if f"{VERSIONS_DIR}/{entry.name}" not in keep and entry.is_dir() and not entry.is_symlink():
                    self._rmtree(entry)

    def tidy(self) -> bool:
        """Remove what an interrupted transition left (staging folders, temp links and records, orphan version
        folders), taking the lock only when there is something to remove; returns whether there was."""
        if not self.path.is_dir():
            return False
        state = self.read()
        keep = {e["dir"] for e in (state.current, state.previous, state.trial) if e}
        versions = self.path / VERSIONS_DIR
        orphans = versions.is_dir() and any(f"{VERSIONS_DIR}/{p.name}" not in keep for p in versions.iterdir())
        stray = any(p.name.startswith((STAGING_PREFIX, LINK_TMP_PREFIX)) or _is_temp_record(p.name)
                    for p in self.path.iterdir())
        if not (orphans or stray):
            return False
        with self.lock(create=False):
            self.remove_leftovers()
        return True

    @staticmethod
    def _rmtree(folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)  # version files are read-only, their folder is not

    def _free_version_dir(self, version: str) -> str:
        name, n = version, 1
        while (self.path / VERSIONS_DIR / name).exists():
            n += 1
            name = f"{version}~{n}"
        return f"{VERSIONS_DIR}/{name}"

    # --- transitions ---------------------------------------------------------------------------------------------

    def add_version(self, version: str, files: Mapping[str, bytes], check: Callable[[Path], None]) -> str:
        """Write ``files`` durably into a new version folder; returns its ``versions/<name>``. ``check(folder)``
        verifies what reached the disk before the folder gets its place. Nothing references the folder yet."""
        self._require_lock()
        staging = new_dir = None
        try:
            self.remove_leftovers()
            (self.path / VERSIONS_DIR).mkdir(exist_ok=True)
            _fsync_dir(self.path)
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.path))
            for name, data in files.items():
                _write_synced(staging / name, data)
            check(staging)
            os.chmod(staging, 0o755)  # mkdtemp makes it 0700; the runtime may run as another user
            _fsync_dir(staging)
            new_dir = self._free_version_dir(version)
            os.rename(staging, self.path / new_dir)
            staging = None
            _fsync_dir(self.path / VERSIONS_DIR)
            return new_dir
        except BaseException as e:
            for leftover in (staging, new_dir and self.path / new_dir):
                if leftover and Path(leftover).exists():
                    self._rmtree(Path(leftover))
            if isinstance(e, OSError):
                cur = self.read().current
                still = f"{cur['version']} is still in service" if cur else "nothing is in service"
                raise EdgekitError(f"install of {version} failed ({os_error_text(e)}); {still}") from e
            raise

    def commit_install(self, rel_dir: str, version: str, key_id: Optional[str]) -> DeviceState:
        """``edgekit install``: an operator puts a version straight in service (no trial, no health check)."""
        self._require_lock()
        state = self.read()
        try:
            self._switch_current(rel_dir)  # the commit point
        except BaseException as e:
            if self._current_link() != rel_dir:  # not switched: the old version still serves
                self._rmtree(self.path / rel_dir)
                if isinstance(e, OSError):
                    still = (f"{state.current['version']} is still in service" if state.current
                             else "nothing is in service")
                    raise EdgekitError(f"install of {version} failed ({os_error_text(e)}); {still}") from e
            raise
        previous = state.current
        state.previous, state.current = previous, {"version": version, "dir": rel_dir}
        unblocked = state.blocked.pop(version, None)
        state.interrupted.pop(version, None)
        state.log("install", version, **{"from": previous["version"] if previous else None, "key_id": key_id,
                                         "unblocked": unblocked})
        self._save(state, f"{version} is in service")
        self.remove_leftovers(state)
        return state

    def begin_trial(self, rel_dir: str, version: str, key_id: Optional[str]) -> DeviceState:
        """Record ``rel_dir`` as the trial, durably, before its check runs; it does not serve."""
        self._require_lock()
        state = self.read()
        state.trial = {"version": version, "dir": rel_dir, "started": utc_now()}
        state.log("trial", version, key_id=key_id, attempt=state.interrupted.get(version, 0) + 1)
        self._save(state, f"{version} could not start its trial")
        return state

    def hold_for_canary(self, version: str, health: Optional[dict] = None) -> DeviceState:
        """The trial passed its health check on a root with a canary policy: keep it as a trial, marked
        trial["phase"] = "canary", for a station to judge on live images; ROOT/current is not touched (it never
        serves before ``commit``)."""
        self._require_lock()
        state = self.read()
        if not state.trial or state.trial["version"] != version:
            raise EdgekitError(f"no trial of {version} to hold for a canary at {self.path}")
        summary = {k: health.get(k) for k in ("images", "top1_agreement", "max_abs_diff")} if health else None
        state.trial = {**state.trial, "phase": CANARY_PHASE, "held": utc_now(),
                       **({"health": summary} if summary else {})}
        state.log("canary-hold", version, policy=state.canary)
        self._save(state, f"{version} passed its health check but could not be put on canary hold")
        return state

    def set_canary_policy(self, policy: Optional[dict]) -> Optional[dict]:
        """Record the canary policy ``edgekit update`` follows (None: no canary, a trial that passes its health
        check is committed at once); returns it, checked. Recorded in the history only when it changes."""
        checked = check_canary_policy(policy) if policy is not None else None
        with self.lock():
            state = self.read()
            if state.canary == checked:
                return checked
            state.canary = checked
            state.log("canary-policy", None, policy=checked or "none")
            self._save(state, "the canary policy was not recorded")
        return checked

    def commit(self, version: str, reason: Optional[str] = None) -> DeviceState:
        """The trial passed its check (or its canary, ``reason`` says how it was judged): switch ROOT/current to
        it (the commit point), then record it."""
        self._require_lock()
        state = self.read()
        if not state.trial or state.trial["version"] != version:
            raise EdgekitError(f"no trial of {version} to commit at {self.path}")
        rel_dir = state.trial["dir"]
        self._switch_current(rel_dir)
        previous = state.current
        state.previous, state.current, state.trial = previous, {"version": version, "dir": rel_dir}, None
        state.interrupted.pop(version, None)
        state.log("commit", version, **{"from": previous["version"] if previous else None, "reason": reason})
        self._save(state, f"{version} is committed and in service")
        self.remove_leftovers(state)
        return state

    def fail(self, version: str, reason: str) -> DeviceState:
        """The trial failed its check: discard it and block its version (the committed one keeps serving)."""
        self._require_lock()
        state = self.read()
        if state.trial and state.trial["version"] == version:
            state.trial = None
        state.blocked[version] = reason
        state.interrupted.pop(version, None)
        state.log("failed", version, reason=reason)
        self._save(state, f"the trial of {version} failed")
        self.remove_leftovers(state)
        return state

    def recover(self) -> Optional[dict]:
        """Discard a stale trial (one no live process is checking) and count the interruption; returns
        {"version", "reason", "blocked"} when one was found, else None.

        Cheap and write-free when there is no trial; a trial on canary hold is not stale (its check passed). When another process holds the lock (an update checking its
        trial right now) or ROOT is not writable (a runtime running as another user), nothing is done: a trial
        never serves, so leaving it changes nothing for the reader."""
        try:
            state = self.read()
            if state.trial is None or state.held:
                return None  # nothing on trial, or a trial on canary hold: its check passed, it waits for a station
        except EdgekitError:
            return None  # an unreadable state is reported by whoever reads it for real
        try:
            with self.lock(create=False):
                state = self.read()
                if state.trial is None or state.held:
                    return None
                version = state.trial["version"]
                count = state.interrupted.get(version, 0) + 1
                state.trial = None
                blocked = count >= MAX_TRIAL_INTERRUPTIONS
                reason = f"its health check was interrupted (kill, power loss or crash) {count} time(s)"
                if blocked:
                    state.blocked[version] = reason
                    state.interrupted.pop(version, None)
                else:
                    state.interrupted[version] = count
                state.log("interrupted", version, reason=reason, blocked=blocked)
                self._save(state, f"a stale trial of {version} was found")
                self.remove_leftovers(state)
                return {"version": version, "reason": reason, "blocked": blocked}
        except (EdgekitError, PermissionError):
            return None

    def rollback(self, reason: Optional[str] = None, check_folder: Optional[Callable[[Path], None]] = None) -> dict:
        """Put the previous version back in service; the version rolled back from is blocked for automatic updates
        (``edgekit update --allow`` lifts it), the one rolled back to is unblocked."""
        if not self.path.is_dir():
            raise EdgekitError(f"nothing to roll back: {self.path} does not exist")
        with self.lock(create=False):
            state = self.read()
            if state.current is None:
                raise EdgekitError(f"nothing to roll back: no adapter is installed at {self.path}")
            if state.previous is None:
                raise EdgekitError(f"nothing to roll back: no previous version is kept at {self.path} "
                                   f"({state.current['version']} is the only one)")
            folder = self.path / state.previous["dir"]
            if check_folder is not None:
                try:
                    check_folder(folder)
                except (OSError, ValueError, KeyError, TypeError, EdgekitError) as e:
                    raise EdgekitError(f"previous version {state.previous['version']} at {folder} is damaged ({e}); "
                                       "not rolling back") from None
            try:
                self._switch_current(state.previous["dir"])  # the commit point
            except OSError as e:
                if self._current_link() == state.previous["dir"]:  # switched; only the fsync after it failed
                    raise
                raise EdgekitError(f"rollback failed ({os_error_text(e)}); {state.current['version']} is still in "
                                   "service") from e
            back, away = state.previous, state.current
            state.current, state.previous = back, away
            why = reason or "rolled back by the operator"
            state.blocked[away["version"]] = why
            state.blocked.pop(back["version"], None)
            state.log("rollback", back["version"], **{"from": away["version"], "reason": reason})
            self._save(state, f"{back['version']} is back in service")
        return {"version": back["version"], "from": away["version"], "path": str(folder.resolve()),
                "blocked": away["version"]}

    def allow(self, version: str) -> bool:
        """Lift the block on ``version`` (an explicit operator act); returns whether it was blocked."""
        with self.lock():
            state = self.read()
            was = state.blocked.pop(version, None)
            had = state.interrupted.pop(version, None)
            if was is None and had is None:
                return False
            state.log("allow", version, reason=was)
            self._save(state, f"{version} was allowed again")
            return was is not None

    def pin(self, version: Optional[str]) -> None:
        """Hold the device at ``version`` (None: unpin); ``update`` installs nothing else while pinned."""
        with self.lock():
            state = self.read()
            if state.pinned == version:
                return
            state.log("pin" if version else "unpin", version or state.pinned)
            state.pinned = version
            self._save(state, "the pin was changed")

    def raise_time_floor(self, when: float) -> float:
        """Persist max(the recorded floor, ``when``); returns the new floor. Kept beside TUF's trusted metadata
        (ROOT/tuf), which it protects: it advances with every verified refresh, not with the installed version."""
        floor = max(self.time_floor() or 0.0, float(when))
        path = self.path / TRUSTED_TIME_FILE
        with atomic_write(path, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            json.dump({"time_floor": floor, "time_floor_utc": datetime.fromtimestamp(floor, timezone.utc)
                       .strftime("%Y-%m-%dT%H:%M:%SZ")}, f)
            f.write("\n")
        return floor


def now() -> float:
    """The device clock (seconds since the epoch)."""
    return time.time()
