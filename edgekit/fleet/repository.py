"""An adapter repository on The Update Framework (TUF), for fleets of devices.

All signing, metadata formats and checks are python-tuf's (``tuf.api.metadata``, ``tuf.repository``) with
securesystemslib's signers; this module only lays the files out and decides what to sign with which key.

Repository folder (serve ``metadata/`` and ``targets/`` as static files: any HTTP server or object store)::

    edgekit-repository.json     this tool's settings: expiry per role, where each key's private file is,
                                the trusted package signing keys. No secrets; not needed by devices.
    metadata/<N>.root.json      every root version (devices walk them to rotate keys)
    metadata/<N>.targets.json   consistent snapshots: versioned targets, delegated roles and snapshot
    metadata/<N>.<role>.json
    metadata/<N>.snapshot.json
    metadata/timestamp.json     the only unversioned file; written last, so it is the commit point
    targets/adapters/<sha256>.<task>.<backbone sha256[:16]>.zip   packages, named by content hash

A package's target path is ``adapters/<task>.<backbone_sha256[:16]>.zip``: one path per task and backbone,
holding its newest version, so a device asks for exactly one path; a backbone package's is
``backbones/<backbone name>.zip``. Its custom metadata (signed by the role) carries the task, version,
backbone and, for information, the package signer's key. Devices do NOT take the signer's key from it: they
verify the package's seal against the keys of their own trust bundle (``edgekit.ota.trust``, written by
``provision``), scoped per task, so that no online key alone can authorise a package.

Package keys (``edgekit-repository.json`` ``package_keys``): key id -> {"public": raw hex, "tasks": [patterns],
"backbones": [patterns]}. ``add`` refuses a package whose signer's scope does not cover it, and
``provision`` copies keys and scopes into the device trust bundle.

Keys: ``edgekit keygen`` key pairs (Ed25519, PKCS#8 PEM), one folder per key: ``KEYDIR/root-1`` ...,
``KEYDIR/targets``, ``KEYDIR/snapshot``, ``KEYDIR/timestamp``. Root keys are offline keys: only root
changes (key rotation, new expiry) need them, and then ``--sign-with`` brings them back.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from edgekit.errors import EdgekitError
from edgekit.utils import atomic_write

CONFIG_NAME = "edgekit-repository.json"
CONFIG_FORMAT = "edgekit-tuf-repository"
METADATA_DIR = "metadata"
TARGETS_DIR = "targets"
TOP_LEVEL = ("root", "targets", "snapshot", "timestamp")
DEFAULT_EXPIRES = {"root": "365d", "targets": "90d", "snapshot": "7d", "timestamp": "1d"}
_DURATION_RE = re.compile(r"^([1-9][0-9]*)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_ROLE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")


# --- durations and paths -----------------------------------------------------------------------------------

def parse_duration(text: str, what: str = "duration") -> int:
    """``30s`` / ``10m`` / ``12h`` / ``1d`` / ``2w`` -> seconds; one error line for anything else."""
    m = _DURATION_RE.match(str(text).strip())
    if not m:
        raise EdgekitError(f"{what} {text!r}: expected a number and a unit s, m, h, d or w (e.g. 30s, 10m, 1d)")
    return int(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def parse_expires(text: Optional[str]) -> Dict[str, int]:
    """``root=365d,targets=90d,...`` -> seconds per role; roles not named keep their defaults."""
    out = {role: parse_duration(d) for role, d in DEFAULT_EXPIRES.items()}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        role, sep, duration = part.partition("=")
        role = role.strip()
        if not sep or role not in TOP_LEVEL:
            raise EdgekitError(f"--expires {part!r}: expected ROLE=DURATION with ROLE one of {', '.join(TOP_LEVEL)}")
        out[role] = parse_duration(duration, f"--expires {role}")
    return out


def target_path(task: str, backbone_sha256: str) -> str:
    """The one target path of a task's adapter for a backbone (newest version)."""
    from edgekit.mlff.names import check_name

    return f"adapters/{check_name(task, 'task name')}.{backbone_sha256[:16]}.zip"


def backbone_target_path(name: str) -> str:
    """The one target path of a backbone package (newest version)."""
    from edgekit.mlff.names import check_name

    return f"backbones/{check_name(name, 'backbone name')}.zip"


def _utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


# --- keys --------------------------------------------------------------------------------------------------

def _key_files(path: str | os.PathLike):
    """(private PEM or None, public PEM or None) for a keygen folder, a private_key.pem or a public_key.pem."""
    from edgekit.ota.keys import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME

    p = Path(path)
    if p.is_dir():
        priv, pub = p / PRIVATE_KEY_NAME, p / PUBLIC_KEY_NAME
        if not priv.is_file() and not pub.is_file():
            raise EdgekitError(f"key folder {p} has neither {PRIVATE_KEY_NAME} nor {PUBLIC_KEY_NAME}")
        return (priv if priv.is_file() else None), (pub if pub.is_file() else None)
    if not p.is_file():
        raise EdgekitError(f"key {p} not found (give an edgekit keygen folder or one of its PEM files)")
    head = p.read_bytes()[:64]
    return (p, None) if b"PRIVATE KEY" in head else (None, p)


def public_key(path: str | os.PathLike):
    """The securesystemslib public key (``SSlibKey``) of a key folder or PEM file."""
    from securesystemslib.signer import SSlibKey

    from edgekit.ota.keys import load_private_key, load_public_key

    priv, pub = _key_files(path)
    crypto = load_public_key(pub) if pub is not None else load_private_key(priv).public_key()
    return SSlibKey.from_crypto(crypto)


def _signer(private_path: Path):
    from securesystemslib.signer import CryptoSigner

    from edgekit.ota.keys import load_private_key

    return CryptoSigner(load_private_key(private_path))


def _keyid_of(ref: str, known: Iterable[str]) -> str:
    """A key id from a key file/folder, or a (prefix of a) key id among ``known``."""
    if Path(ref).exists():
        return public_key(ref).keyid
    hits = [k for k in known if k.startswith(ref.lower())] if len(ref) >= 8 else []
    if len(hits) != 1:
        raise EdgekitError(f"key {ref!r}: no such key file, and not the id (or an 8+ digit prefix) of exactly one "
                           "key of that role")
    return hits[0]


# --- the repository ----------------------------------------------------------------------------------------

def _tuf():
    try:
        import tuf.api.metadata as md
        import tuf.repository as repository
    except ImportError:
        from edgekit.errors import MissingBackendError

        raise MissingBackendError("TUF repositories", "tuf") from None
    return md, repository


def _make_repository_class():
    md, repository = _tuf()
    from tuf.api.serialization.json import JSONSerializer

    class FleetRepository(repository.Repository):
        """python-tuf's Repository over the folder layout above (see the module docstring)."""

        def __init__(self, folder: Path, config: dict, extra_signers: Sequence = (),
                     expires_override: Optional[Mapping[str, int]] = None):
            self.folder = Path(folder)
            self.meta_dir = self.folder / METADATA_DIR
            self.config = config
            self.extra = {s.public_key.keyid: s for s in extra_signers}
            self.expires_override = dict(expires_override or {})
            self.written: List[str] = []

        # -- storage
        def _versions(self, role: str) -> List[int]:
            if not self.meta_dir.is_dir():
                return []
            suffix = f".{role}.json"
            out = []
            for p in self.meta_dir.iterdir():
                head = p.name[:-len(suffix)] if p.name.endswith(suffix) else ""
                if head.isdigit():
                    out.append(int(head))
            return sorted(out)

        def latest_version(self, role: str) -> int:
            if role == "timestamp":
                return self.open("timestamp").signed.version if (self.meta_dir / "timestamp.json").is_file() else 0
            v = self._versions(role)
            return v[-1] if v else 0

        def _path(self, role: str, version: int) -> Path:
            return self.meta_dir / ("timestamp.json" if role == "timestamp" else f"{version}.{role}.json")

        def open(self, role: str):
            version = self.latest_version(role) if role != "timestamp" else None
            path = self.meta_dir / "timestamp.json" if role == "timestamp" else self._path(role, version or 0)
            if path.is_file():
                try:
                    return md.Metadata.from_bytes(path.read_bytes())
                except Exception as e:  # tuf's DeserializationError and friends
                    raise EdgekitError(f"{path} is not readable TUF metadata ({e})") from None
            if role == "root":
                return md.Metadata(md.Root(consistent_snapshot=True))
            if role == "snapshot":
                return md.Metadata(md.Snapshot())
            if role == "timestamp":
                return md.Metadata(md.Timestamp())
            return md.Metadata(md.Targets())

        def _expiry_seconds(self, role: str) -> int:
            if role in self.expires_override:
                return self.expires_override[role]
            exp = self.config["expires"]
            return int(exp.get(role, exp["targets"]))

        def _delegator(self, role: str):
            """The Root or Targets that lists ``role``'s keys."""
            if role in TOP_LEVEL:
                return self.root() if role != "root" else None
            return self.targets()

        def _signers_for(self, keyids: Iterable[str]):
            out = []
            for kid in keyids:
                if kid in self.extra:
                    out.append(self.extra[kid])
                    continue
                path = self.config["key_files"].get(kid)
                if path and Path(path).is_file():
                    out.append(_signer(Path(path)))
            return out

        def close(self, role: str, metadata) -> None:
            signed = metadata.signed
            on_disk = self._path(role, signed.version).is_file() if role != "timestamp" else \
                (self.meta_dir / "timestamp.json").is_file()
            if on_disk:
                signed.version += 1
            signed.expires = _utc_now() + _dt.timedelta(seconds=self._expiry_seconds(role))
            metadata.signatures.clear()
            if role == "root":
                previous = self.root() if self._versions("root") else None
                keyids = list(signed.roles["root"].keyids) + (list(previous.roles["root"].keyids) if previous else [])
            else:
                delegator = self._delegator(role)
                keyids = delegator.get_delegated_role(role).keyids
            for s in self._signers_for(dict.fromkeys(keyids)):
                metadata.sign(s, append=True)
            # refuse, writing nothing, when the signatures do not reach the threshold(s) clients will check
            checks = [(signed, "new")] if role == "root" else [(self._delegator(role), "")]
            if role == "root" and previous is not None:
                checks.append((previous, "current"))
            for delegator, which in checks:
                res = delegator.get_verification_result(role, metadata.signed_bytes, metadata.signatures)
                if not res.verified:
                    missing = sorted(set(res.unsigned))
                    raise EdgekitError(
                        f"cannot sign {role}: {len(res.signed)} of the {res.threshold} signatures the {which + ' ' if which else ''}"
                        f"{'root' if role in TOP_LEVEL else 'targets'} metadata requires; missing private keys "
                        f"{', '.join(k[:12] for k in missing)} (bring them with --sign-with)")
            self.meta_dir.mkdir(parents=True, exist_ok=True)
            path = self._path(role, signed.version)
            with atomic_write(path) as f:
                os.fchmod(f.fileno(), 0o644)
                f.write(metadata.to_bytes(JSONSerializer(compact=False)))
            self.written.append(path.name)

        @property
        def targets_infos(self):
            roles = ["targets"] + self.delegated_roles()
            return {f"{r}.json": md.MetaFile(version=self.latest_version(r)) for r in roles if self.latest_version(r)}

        @property
        def snapshot_info(self):
            return md.MetaFile(version=self.latest_version("snapshot"))

        def delegated_roles(self) -> List[str]:
            if not self._versions("targets"):
                return []
            d = self.targets().delegations
            return list(d.roles) if d and d.roles else []

    return FleetRepository


_REPO_CLASS = None


def _repo_class():
    global _REPO_CLASS
    if _REPO_CLASS is None:
        _REPO_CLASS = _make_repository_class()
    return _REPO_CLASS


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise EdgekitError(f"{folder} is not an edgekit repository (no {CONFIG_NAME}); create one with edgekit repo init")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgekitError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise EdgekitError(f"{path} is not an edgekit repository configuration")
    return config


def _write_config(folder: Path, config: dict) -> None:
    with atomic_write(folder / CONFIG_NAME, "w") as f:
        os.fchmod(f.fileno(), 0o644)
        json.dump(config, f, indent=2)
        f.write("\n")


def open_repository(folder: str | os.PathLike, sign_with: Sequence[str | os.PathLike] = (),
                    expires_override: Optional[Mapping[str, int]] = None):
    """The repository in ``folder``; ``sign_with``: extra private key files (e.g. offline root keys)."""
    folder = Path(folder)
    config = _read_config(folder)
    signers = []
    for ref in sign_with:
        priv, _ = _key_files(ref)
        if priv is None:
            raise EdgekitError(f"--sign-with {ref}: a private key is needed to sign")
        signers.append(_signer(priv))
    return _repo_class()(folder, config, signers, expires_override)


def _tuf_errors():
    """Errors of the TUF API that mean 'this edit is not valid' (turned into one error line)."""
    from tuf.api.exceptions import RepositoryError

    return (ValueError, RepositoryError)


@contextlib.contextmanager
def _edit_guard(what: str):
    try:
        yield
    except EdgekitError:
        raise
    except _tuf_errors() as e:
        raise EdgekitError(f"{what}: {e}") from None


# --- operations --------------------------------------------------------------------------------------------

def init_repository(folder: str | os.PathLike, keydir: str | os.PathLike, root_keys: int = 3,
                    root_threshold: int = 2, expires: Optional[str] = None,
                    package_keys: Sequence[str | os.PathLike] = (), package_tasks: Sequence[str] = ("*",),
                    package_backbones: Sequence[str] = ()) -> dict:
    """Create a TUF repository in ``folder`` (new or empty) with the keys in ``keydir``.

    ``package_keys`` are trusted for the tasks matching ``package_tasks`` and the backbones matching
    ``package_backbones`` (narrow or add keys later with ``package_key``).

    ``keydir`` missing: created with a new key pair per key (root-1..N, targets, snapshot, timestamp).
    Present: those key folders must be there. The repository is written to a temporary sibling folder and
    moved into place at the end, so a failure leaves nothing behind.
    """
    from edgekit.ota.keys import generate_keypair

    _tuf()
    folder, keydir = Path(folder), Path(keydir)
    if not (1 <= root_threshold <= root_keys <= 16):
        raise EdgekitError(f"--root-threshold {root_threshold} must be between 1 and --root-keys {root_keys} (<= 16)")
    seconds = parse_expires(expires)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise EdgekitError(f"{folder} exists and is not empty; give a new or empty folder")
    names = [f"root-{i}" for i in range(1, root_keys + 1)] + ["targets", "snapshot", "timestamp"]
    created_keys = not keydir.exists()
    if created_keys:
        for name in names:
            generate_keypair(keydir / name)
    missing = [n for n in names if not (keydir / n / "private_key.pem").is_file()]
    if missing:
        raise EdgekitError(f"key folder {keydir} lacks {', '.join(missing)} (each an edgekit keygen folder with "
                           "private_key.pem); give a new folder to create all keys")
    keys = {n: public_key(keydir / n) for n in names}
    config = {"format": CONFIG_FORMAT, "format_version": 1, "expires": seconds,
              "key_files": {keys[n].keyid: str((keydir / n / "private_key.pem").resolve()) for n in names},
              "package_keys": {}}
    for ref in package_keys:
        _add_package_key(config, ref, package_tasks, package_backbones)

    parent = folder.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.init-", dir=parent))
    try:
        _write_config(tmp, config)
        repo = _repo_class()(tmp, config)
        with _edit_guard("init"):
            with repo.edit_root() as root:
                for n in names:
                    root.add_key(keys[n], n.split("-")[0])
                root.roles["root"].threshold = root_threshold
            with repo.edit_targets():
                pass
            repo.do_snapshot(force=True)
            repo.do_timestamp(force=True)
        (tmp / TARGETS_DIR / "adapters").mkdir(parents=True)
        (tmp / TARGETS_DIR / "backbones").mkdir()
        os.chmod(tmp, 0o755)
        if folder.exists():
            folder.rmdir()
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_keys:
            shutil.rmtree(keydir, ignore_errors=True)
        raise
    return {"repository": str(folder), "trust_root": str(folder / METADATA_DIR / "1.root.json"),
            "root_keys": [str(keydir / n / "private_key.pem") for n in names if n.startswith("root-")],
            "root_threshold": root_threshold,
            "online_keys": {n: str(keydir / n / "private_key.pem") for n in ("targets", "snapshot", "timestamp")},
            "keys_created": created_keys, "expires": seconds}


def _add_package_key(config: dict, ref, tasks: Sequence[str] = ("*",), backbones: Sequence[str] = ()) -> str:
    """Trust a package signing key (edgekit keygen public key) for ``tasks`` and ``backbones`` (patterns)."""
    from cryptography.hazmat.primitives import serialization

    from edgekit.ota.keys import key_id, load_private_key, load_public_key
    from edgekit.ota.trust import check_pattern

    priv, pub = _key_files(ref)
    crypto = load_public_key(pub) if pub is not None else load_private_key(priv).public_key()
    kid = key_id(crypto)
    tasks = [check_pattern(t, "--tasks pattern") for t in tasks]
    backbones = [check_pattern(b, "--backbones pattern") for b in backbones]
    if not tasks and not backbones:
        raise EdgekitError("a package key must be trusted for some tasks or backbones (--tasks / --backbones)")
    raw = crypto.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    config["package_keys"][kid] = {"public": raw, "tasks": tasks, "backbones": backbones}
    return kid


def _package_keys(config: dict) -> Dict[str, dict]:
    """The configured package keys; a key stored by an older edgekit (raw hex only) is trusted for every task."""
    out = {}
    for kid, entry in (config.get("package_keys") or {}).items():
        out[kid] = {"public": entry, "tasks": ["*"], "backbones": []} if isinstance(entry, str) else entry
    return out


def _scoped_keys(config: dict) -> list:
    from edgekit.ota.trust import scoped_key_from_raw

    return [scoped_key_from_raw(e["public"], e.get("tasks", []), e.get("backbones", []))
            for e in _package_keys(config).values()]


def package_key(folder: str | os.PathLike, key: str | os.PathLike, tasks: Sequence[str] = (),
                backbones: Sequence[str] = (), remove: bool = False) -> dict:
    """Trust a package key for ``tasks``/``backbones`` (replacing its scope), or stop trusting it.

    Devices learn of the change only when they are re-provisioned with a new trust bundle (``provision``):
    the repository cannot widen what a device trusts, which is the point of the second authority."""
    repo = open_repository(folder)
    if remove:
        kid = _keyid_of(str(key), list(_package_keys(repo.config)))
        del repo.config["package_keys"][kid]
        _write_config(repo.folder, repo.config)
        return {"key_id": kid, "removed": True}
    kid = _add_package_key(repo.config, key, tasks, backbones)
    _write_config(repo.folder, repo.config)
    return {"key_id": kid, **repo.config["package_keys"][kid]}


def provision(folder: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> dict:
    """Write a device trust bundle (``edgekit.ota.trust``): the newest root, timestamp and snapshot metadata
    and the package keys with their scopes, issued now."""
    from edgekit.ota.trust import ROOT_NAME, TRUST_NAME, write_bundle

    repo = open_repository(folder)
    keys = _scoped_keys(repo.config)
    if not keys:
        raise EdgekitError("the repository trusts no package key yet (repo init --package-key, or repo package-key)")
    root_version = repo.latest_version("root")
    root = (repo.meta_dir / f"{root_version}.root.json").read_bytes()
    seeds = {"timestamp": (repo.meta_dir / "timestamp.json").read_bytes()}
    snap = repo.latest_version("snapshot")
    if snap:
        seeds["snapshot"] = (repo.meta_dir / f"{snap}.snapshot.json").read_bytes()
    path = write_bundle(out, root, keys, seeds, force=force)
    return {"bundle": str(path), "root_version": root_version, "timestamp_version": repo.timestamp().version,
            "snapshot_version": snap, "files": sorted(p.name for p in path.iterdir()),
            "package_keys": [k.to_json() for k in keys], "root": ROOT_NAME, "trust": TRUST_NAME}


def _role_for_path(repo, path: str, role: Optional[str]) -> str:
    """The role that signs ``path``: ``role`` when given (refused outside its delegated paths), else the
    delegated role whose paths cover it, else targets."""
    targets = repo.targets()
    delegations = targets.delegations.roles if targets.delegations and targets.delegations.roles else {}
    if role is None:
        for name, d in delegations.items():
            if d.is_delegated_path(path):
                return name
        return "targets"
    if role == "targets":
        return role
    if role not in delegations:
        raise EdgekitError(f"--role {role}: no such delegated role (roles: targets"
                           f"{', ' + ', '.join(delegations) if delegations else ''})")
    if not delegations[role].is_delegated_path(path):
        raise EdgekitError(f"role {role} may publish only {', '.join(delegations[role].paths)}; {path} is outside "
                           "its paths")
    return role


def add_packages(folder: str | os.PathLike, packages: Sequence[str | os.PathLike], role: Optional[str] = None,
                 pubkeys: Sequence[str | os.PathLike] = (), sign_with: Sequence[str | os.PathLike] = ()) -> List[dict]:
    """Add signed adapter (or backbone) packages as targets (a new version of each role that changed; publish
    to serve). Each must be sealed by a package key whose scope covers its task or backbone name."""
    from edgekit.ota.package import BACKBONE_KIND, BACKBONE_MAX_SIZE, verify_package
    from edgekit.mlff.version import parse_version

    md, _ = _tuf()
    repo = open_repository(folder, sign_with)
    if pubkeys:
        for ref in pubkeys:
            _add_package_key(repo.config, ref)
    scoped = {k.key.key_id: k for k in _scoped_keys(repo.config)}
    if not scoped:
        raise EdgekitError("no package signing key is trusted by this repository: give the public key packages are "
                           "signed with (--pubkey, kept for later adds)")
    trusted = {kid: k.key for kid, k in scoped.items()}
    if not packages:
        raise EdgekitError("no package given")
    plan: Dict[str, list] = {}
    seen = set()
    for p in packages:
        pkg = verify_package(p, trusted, max_size=BACKBONE_MAX_SIZE, kind=None)
        m = pkg.manifest
        if not scoped[pkg.signer.key_id].may_sign(pkg.kind, pkg.name):
            what = "task" if pkg.kind != BACKBONE_KIND else "backbone"
            raise EdgekitError(f"{Path(p).name}: package key {pkg.signer.key_id[:16]}… may not sign {what} {pkg.name} "
                               f"(edgekit repo package-key sets its scope)")
        path = backbone_target_path(pkg.name) if pkg.kind == BACKBONE_KIND else target_path(m["task"], m["backbone_sha256"])
        if path in seen:
            raise EdgekitError(f"two packages for {path}; add one at a time")
        seen.add(path)
        name = _role_for_path(repo, path, role)
        current = repo.targets(name).targets.get(path) if repo.latest_version(name) else None
        old = (current.custom or {}).get("edgekit", {}).get("version") if current else None
        if old is not None and parse_version(m["version"]) <= parse_version(old):
            raise EdgekitError(f"{Path(p).name}: version {m['version']} is not newer than {old}, which the "
                               f"repository already serves at {path}")
        data = Path(p).read_bytes()
        tf = md.TargetFile.from_data(path, data, ["sha256"])
        # informational: devices verify the seal against their own trust bundle, never against this key
        custom = {"kind": pkg.kind, "version": m["version"], "backbone": m["backbone"],
                  "backbone_sha256": m["backbone_sha256"], "package_key_id": pkg.signer.key_id,
                  "created_utc": m["created_utc"]}
        if pkg.kind != BACKBONE_KIND:
            custom.update(task=m["task"], classes=m["classes"])
        tf.unrecognized_fields["custom"] = {"edgekit": custom}
        plan.setdefault(name, []).append((tf, data, m))
    # package files first (content-addressed: never overwritten), then each role's new metadata version
    for items in plan.values():
        for tf, data, _ in items:
            digest = tf.hashes["sha256"]
            dirname, _, base = tf.path.rpartition("/")
            out = repo.folder / TARGETS_DIR / dirname / f"{digest}.{base}"
            # names are checked (edgekit.mlff.names), and the written file must still be inside targets/
            if not out.resolve().is_relative_to((repo.folder / TARGETS_DIR).resolve()):
                raise EdgekitError(f"target {tf.path} would be written outside {repo.folder / TARGETS_DIR}; refused")
            out.parent.mkdir(parents=True, exist_ok=True)
            if not out.is_file():
                with atomic_write(out) as f:
                    os.fchmod(f.fileno(), 0o644)
                    f.write(data)
    results = []
    for name, items in plan.items():
        with _edit_guard(f"add to {name}"), repo.edit_targets(name) as targets:
            for tf, _, m in items:
                targets.targets[tf.path] = tf
        for tf, data, m in items:
            results.append({"package": m.get("task", m["backbone"]) + " " + m["version"], "target": tf.path, "role": name,
                            "length": len(data), "sha256": tf.hashes["sha256"],
                            "role_version": repo.latest_version(name)})
    if pubkeys:
        _write_config(repo.folder, repo.config)
    return results


def delegate(folder: str | os.PathLike, name: str, paths: Sequence[str], key: str | os.PathLike,
             sign_with: Sequence[str | os.PathLike] = ()) -> dict:
    """Delegate the target paths ``paths`` (glob patterns, e.g. ``adapters/crack-*``) to a new role ``name``
    signed by ``key``; only that role can then publish them (terminating delegation)."""
    md, _ = _tuf()
    if not _ROLE_NAME_RE.match(name or "") or name in TOP_LEVEL:
        raise EdgekitError(f"role name {name!r}: use lowercase letters, digits, '.', '_' or '-', not a top-level role")
    if not paths or any(not p or p.startswith("/") for p in paths):
        raise EdgekitError("--paths: give one or more relative path patterns, e.g. 'adapters/crack-*'")
    repo = open_repository(folder, sign_with)
    if name in repo.delegated_roles():
        raise EdgekitError(f"role {name} is already delegated; change its key with edgekit repo rotate")
    priv, _ = _key_files(key)
    k = public_key(key)
    if priv is not None:
        repo.config["key_files"][k.keyid] = str(Path(priv).resolve())
    if priv is None and k.keyid not in repo.extra:
        raise EdgekitError(f"--key {key}: the role's private key is needed to sign its first metadata")
    with _edit_guard(f"delegate {name}"):
        with repo.edit_targets() as targets:
            if targets.delegations is None:
                targets.delegations = md.Delegations(keys={}, roles={})
            targets.delegations.roles[name] = md.DelegatedRole(name, [], 1, True, list(paths))
            targets.add_key(k, name)
        with repo.edit_targets(name):
            pass
    _write_config(repo.folder, repo.config)
    return {"role": name, "paths": list(paths), "keyid": k.keyid, "targets_version": repo.latest_version("targets")}


def publish(folder: str | os.PathLike, timestamp_expires: Optional[str] = None,
            sign_with: Sequence[str | os.PathLike] = ()) -> dict:
    """New snapshot (when any targets metadata changed) and a new timestamp version, always."""
    override = {"timestamp": parse_duration(timestamp_expires, "--timestamp-expires")} if timestamp_expires else {}
    repo = open_repository(folder, sign_with, override)
    with _edit_guard("publish"):
        snap_new, _ = repo.do_snapshot()
        repo.do_timestamp(force=True)
    ts = repo.timestamp()
    return {"snapshot_version": repo.latest_version("snapshot"), "snapshot_new": snap_new,
            "timestamp_version": ts.version, "timestamp_expires": ts.expires.isoformat().replace("+00:00", "Z")}


def rotate(folder: str | os.PathLike, role: str, add_keys: Sequence[str | os.PathLike] = (),
           remove_keys: Sequence[str] = (), sign_with: Sequence[str | os.PathLike] = ()) -> dict:
    """Add and/or revoke keys of ``role``; the role's metadata is re-signed with its new keys.

    A top-level role's keys live in root: a new root version is written, signed by the threshold of the
    current root keys and of the new ones (TUF clients check both). A delegated role's keys live in the
    targets metadata. Publish afterwards.
    """
    if not add_keys and not remove_keys:
        raise EdgekitError("give --add-key and/or --remove-key")
    repo = open_repository(folder, sign_with)
    original_config = json.loads(json.dumps(repo.config))
    new_keys = []
    for ref in add_keys:
        priv, _ = _key_files(ref)
        k = public_key(ref)
        if priv is not None:
            repo.config["key_files"][k.keyid] = str(Path(priv).resolve())
        new_keys.append(k)
    delegated = repo.delegated_roles()
    if role not in TOP_LEVEL and role not in delegated:
        raise EdgekitError(f"--role {role}: not a role of this repository ({', '.join(list(TOP_LEVEL) + delegated)})")
    # config first (the new private keys must be found to sign), restored if the rotation fails
    _write_config(repo.folder, repo.config)
    try:
        with _edit_guard(f"rotate {role}"):
            if role in TOP_LEVEL:
                with repo.edit_root() as root:
                    current = root.roles[role].keyids
                    removed = [_keyid_of(r, current) for r in remove_keys]
                    for k in new_keys:
                        root.add_key(k, role)
                    for kid in removed:
                        root.revoke_key(kid, role)
                    if len(root.roles[role].keyids) < root.roles[role].threshold:
                        raise EdgekitError(f"{role} would have {len(root.roles[role].keyids)} keys, fewer than its "
                                           f"threshold {root.roles[role].threshold}")
                if role == "targets":
                    with repo.edit_targets():
                        pass
            else:
                with repo.edit_targets() as targets:
                    current = targets.delegations.roles[role].keyids
                    removed = [_keyid_of(r, current) for r in remove_keys]
                    for k in new_keys:
                        targets.add_key(k, role)
                    for kid in removed:
                        targets.revoke_key(kid, role)
                    if not targets.delegations.roles[role].keyids:
                        raise EdgekitError(f"role {role} would have no key left")
                with repo.edit_targets(role):
                    pass
    except BaseException:
        for path in repo.written:  # a partly applied rotation: remove what this call wrote
            with contextlib.suppress(OSError):
                (repo.meta_dir / path).unlink()
        _write_config(repo.folder, original_config)
        raise
    return {"role": role, "added": [k.keyid for k in new_keys], "removed": removed,
            "root_version": repo.latest_version("root"), "written": repo.written}


def status(folder: str | os.PathLike) -> dict:
    """Roles, keys (and whether their private key is at hand), versions, expiry, targets."""
    repo = open_repository(folder)
    root = repo.root()
    now = _utc_now()

    def keyinfo(kid):
        path = repo.config["key_files"].get(kid)
        return {"keyid": kid, "private_key": path, "private_key_present": bool(path and Path(path).is_file())}

    def role_entry(name, signed, keyids, threshold, extra=None):
        exp = signed.expires
        return {"role": name, "version": signed.version, "expires": exp.isoformat().replace("+00:00", "Z"),
                "expired": exp <= now, "threshold": threshold, "keys": [keyinfo(k) for k in keyids], **(extra or {})}

    roles = []
    for name in TOP_LEVEL:
        signed = root if name == "root" else repo.open(name).signed
        extra = {"targets": len(signed.targets)} if name == "targets" else None
        roles.append(role_entry(name, signed, root.roles[name].keyids, root.roles[name].threshold, extra))
    targets = repo.targets()
    for name in repo.delegated_roles():
        d = targets.delegations.roles[name]
        signed = repo.targets(name)
        roles.append(role_entry(name, signed, d.keyids, d.threshold,
                                {"paths": list(d.paths or []), "delegated_by": "targets", "targets": len(signed.targets)}))
    adapters = []
    for name in ["targets"] + repo.delegated_roles():
        for path, tf in repo.targets(name).targets.items():
            e = (tf.custom or {}).get("edgekit", {})
            adapters.append({"target": path, "role": name, "kind": e.get("kind", "adapter"), "task": e.get("task"),
                             "version": e.get("version"),
                             "backbone": e.get("backbone"), "length": tf.length})
    return {"repository": str(repo.folder), "consistent_snapshot": root.consistent_snapshot, "roles": roles,
            "adapters": adapters, "package_keys": [{"key_id": kid, "tasks": e.get("tasks", []),
                                                    "backbones": e.get("backbones", [])}
                                                   for kid, e in sorted(_package_keys(repo.config).items())]}
