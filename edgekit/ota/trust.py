"""The device trust bundle: what a device is provisioned to trust, and for what.

A device installs an adapter only when two independent authorities agree (the split Uptane makes between
its director and image repositories, here between the TUF repository and the package signers):

1. **The TUF chain** (``edgekit update``, python-tuf's ngclient): the package is the one the repository's
   current, unexpired, consistent metadata names for this device's task and backbone, with its length
   and sha256 (freshness, consistency, rollback protection, key rotation; signed by the online
   ``targets``/delegated, ``snapshot`` and ``timestamp`` keys under the offline root threshold).
2. **A package-signing key the device itself was provisioned to trust for that task** (this bundle):
   the package's seal must be by one of these keys, and the key's scope must cover the task (or, for a
   backbone package, the backbone name). Nothing in the repository's metadata can add a key or widen a
   scope: the TUF target metadata still carries the signer's key for information, but the device never
   takes a key from it. So a stolen ``targets`` or delegated key alone (it can point a target at any
   file, but cannot seal one with a provisioned key) and a stolen package key alone (it can seal a file,
   but no TUF metadata names it) are both refused; it takes both.

The bundle is a folder, provisioned with the device like TUF's trusted root (``edgekit repo provision``
writes it from a repository)::

    BUNDLE/root.json        the repository's root metadata at provisioning time (TUF's trust anchor)
    BUNDLE/timestamp.json   optional: the repository's timestamp and snapshot at provisioning time; seeded
    BUNDLE/snapshot.json    into the device's TUF state on its first run, so that even a fresh device
                            refuses metadata older than what existed when it was provisioned (a stolen
                            timestamp key serving an old snapshot; TUF's rollback check does the rest)
    BUNDLE/trust.json       {"format": "edgekit-device-trust", "format_version": 1, "issued": ISO-8601 UTC,
                             "package_keys": [{"key_id": sha256 of the raw key, "public_key": raw hex,
                                               "tasks": ["crack-*", ...], "backbones": ["efficientnet-lite0"]}]}

``tasks`` and ``backbones`` are shell-style patterns (``fnmatch``, case-sensitive) over the names of
``edgekit.mlff.names``. ``issued`` is a floor for the device's clock: metadata that expired before the
bundle was made is refused even if the device's clock says otherwise. Changing the bundle is a
provisioning act on the device (a new ``--trust`` folder), never something the repository can do: that is
the point. For compatibility, ``--trust PATH/1.root.json`` reads ``trust.json`` beside that file.
"""
from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from edgekit.errors import EdgekitError
from edgekit.ota.keys import TrustedKey, key_id

TRUST_NAME = "trust.json"
TRUST_FORMAT = "edgekit-device-trust"
TRUST_FORMAT_VERSION = 1
ROOT_NAME = "root.json"
SEED_ROLES = ("timestamp", "snapshot")
MAX_FILE = 1024 * 1024
_PATTERN_RE = re.compile(r"^[A-Za-z0-9._*?-]{1,64}\Z")


def check_pattern(pattern: str, what: str) -> str:
    """A scope pattern: the name characters plus ``*`` and ``?`` (no brackets, no path separators)."""
    if not isinstance(pattern, str) or not _PATTERN_RE.match(pattern):
        raise EdgekitError(f"{what} {pattern!r}: use letters, digits, '.', '_', '-' and the wildcards * and ?")
    return pattern


@dataclass(frozen=True)
class ScopedKey:
    """A package-signing key and what the device lets it sign."""

    key: TrustedKey
    tasks: Tuple[str, ...] = ()
    backbones: Tuple[str, ...] = ()

    def may_sign(self, kind: str, name: str) -> bool:
        patterns = self.tasks if kind == "adapter" else self.backbones
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    def to_json(self) -> dict:
        from cryptography.hazmat.primitives import serialization

        raw = self.key.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"key_id": self.key.key_id, "public_key": raw.hex(), "tasks": list(self.tasks),
                "backbones": list(self.backbones)}


@dataclass
class TrustBundle:
    root: bytes  # TUF root metadata bytes (the Updater's bootstrap)
    keys: Dict[str, ScopedKey]
    issued: _dt.datetime
    seeds: Dict[str, bytes] = field(default_factory=dict)  # role -> metadata bytes at provisioning time
    source: str = ""

    def keys_for(self, kind: str, name: str) -> Dict[str, TrustedKey]:
        """The keys this device accepts on a package of ``kind`` ("adapter" or "backbone") named ``name``."""
        return {kid: k.key for kid, k in self.keys.items() if k.may_sign(kind, name)}

    def require_keys_for(self, kind: str, name: str) -> Dict[str, TrustedKey]:
        keys = self.keys_for(kind, name)
        if not keys:
            what = "task" if kind == "adapter" else "backbone"
            raise EdgekitError(f"the trust bundle {self.source} has no package key for {what} {name} (its keys may "
                               f"sign: {self.describe_scopes()}); re-provision the device with one that does")
        return keys

    def describe_scopes(self) -> str:
        parts = []
        for k in self.keys.values():
            scope = ", ".join([*(f"task {p}" for p in k.tasks), *(f"backbone {p}" for p in k.backbones)]) or "nothing"
            parts.append(f"{k.key.key_id[:12]}: {scope}")
        return "; ".join(parts) or "no keys"


def _parse_time(text, where: str) -> _dt.datetime:
    try:
        t = _dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise EdgekitError(f"{where}: 'issued' {text!r} is not an ISO-8601 time") from None
    if t.tzinfo is None:
        raise EdgekitError(f"{where}: 'issued' must say its time zone (UTC, ending in Z)")
    return t.astimezone(_dt.timezone.utc)


def _read_small(path: Path, what: str) -> bytes:
    try:
        if path.stat().st_size > MAX_FILE:
            raise EdgekitError(f"{path}: {what} is implausibly large")
        return path.read_bytes()
    except OSError as e:
        raise EdgekitError(f"cannot read {what} {path}: {e.strerror or e}") from None


def parse_trust(data: bytes, where: str) -> Tuple[Dict[str, ScopedKey], _dt.datetime]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise EdgekitError(f"{where}: not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != TRUST_FORMAT:
        raise EdgekitError(f"{where}: not an edgekit device trust file (format {TRUST_FORMAT!r})")
    if doc.get("format_version") != TRUST_FORMAT_VERSION:
        raise EdgekitError(f"{where}: format_version {doc.get('format_version')!r} is not {TRUST_FORMAT_VERSION}")
    issued = _parse_time(doc.get("issued"), where)
    entries = doc.get("package_keys")
    if not isinstance(entries, list) or not entries:
        raise EdgekitError(f"{where}: lists no package key; a device must trust at least one")
    keys: Dict[str, ScopedKey] = {}
    for e in entries:
        if not isinstance(e, dict):
            raise EdgekitError(f"{where}: malformed package_keys entry {e!r}")
        try:
            pk = Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(e.get("public_key"))))
        except ValueError:
            raise EdgekitError(f"{where}: package key {str(e.get('key_id'))[:16]} is not a raw Ed25519 key") from None
        kid = key_id(pk)
        if e.get("key_id") != kid:
            raise EdgekitError(f"{where}: key_id {str(e.get('key_id'))[:16]}… does not match its public key")
        scopes = {}
        for kind in ("tasks", "backbones"):
            pats = e.get(kind, [])
            if not isinstance(pats, list):
                raise EdgekitError(f"{where}: key {kid[:16]}…: '{kind}' must be a list of patterns")
            scopes[kind] = tuple(check_pattern(p, f"{where}: key {kid[:16]}… {kind[:-1]} pattern") for p in pats)
        if not scopes["tasks"] and not scopes["backbones"]:
            raise EdgekitError(f"{where}: key {kid[:16]}… may sign nothing (no tasks, no backbones)")
        if kid in keys:
            raise EdgekitError(f"{where}: key {kid[:16]}… is listed twice")
        keys[kid] = ScopedKey(TrustedKey(kid, pk, f"trust bundle key {kid[:16]}…"), scopes["tasks"],
                              scopes["backbones"])
    return keys, issued


def load_bundle(path: str | os.PathLike) -> TrustBundle:
    """The bundle in folder ``path``, or ``trust.json`` beside a root metadata file ``path``."""
    p = Path(path)
    if p.is_dir():
        folder, root_file = p, p / ROOT_NAME
        if not root_file.is_file():
            numbered = sorted((q for q in p.glob("*.root.json") if q.name.split(".")[0].isdigit()),
                              key=lambda q: int(q.name.split(".")[0]))
            if not numbered:
                raise EdgekitError(f"--trust {p}: a trust bundle folder needs {ROOT_NAME} and {TRUST_NAME} "
                                   "(edgekit repo provision writes one)")
            root_file = numbered[-1]
    elif p.is_file():
        folder, root_file = p.parent, p
    else:
        raise EdgekitError(f"--trust {p}: not found (the device's trust bundle: edgekit repo provision writes one)")
    trust_file = folder / TRUST_NAME
    if not trust_file.is_file():
        raise EdgekitError(f"--trust {p}: no {TRUST_NAME} beside the root metadata: the device must be provisioned "
                           "with the package keys it trusts per task (edgekit repo provision REPO --out BUNDLE)")
    keys, issued = parse_trust(_read_small(trust_file, "trust file"), str(trust_file))
    seeds = {}
    for role in SEED_ROLES:
        f = folder / f"{role}.json"
        if f.is_file() and p.is_dir():
            seeds[role] = _read_small(f, f"{role} metadata")
    return TrustBundle(_read_small(root_file, "root metadata"), keys, issued, seeds, str(p))


def trust_document(keys: Iterable[ScopedKey], issued: Optional[_dt.datetime] = None) -> dict:
    issued = (issued or _dt.datetime.now(_dt.timezone.utc)).astimezone(_dt.timezone.utc).replace(microsecond=0)
    return {"format": TRUST_FORMAT, "format_version": TRUST_FORMAT_VERSION,
            "issued": issued.isoformat().replace("+00:00", "Z"), "package_keys": [k.to_json() for k in keys]}


def scoped_key_from_raw(raw_hex: str, tasks: Sequence[str], backbones: Sequence[str]) -> ScopedKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    pk = Ed25519PublicKey.from_public_bytes(bytes.fromhex(raw_hex))
    kid = key_id(pk)
    return ScopedKey(TrustedKey(kid, pk, f"package key {kid[:16]}…"),
                     tuple(check_pattern(t, "--tasks pattern") for t in tasks),
                     tuple(check_pattern(b, "--backbones pattern") for b in backbones))


def write_bundle(out: str | os.PathLike, root: bytes, keys: Sequence[ScopedKey], seeds: Mapping[str, bytes],
                 force: bool = False) -> Path:
    """Write a bundle folder atomically (a temporary folder renamed into place)."""
    import shutil
    import tempfile

    from edgekit.utils import atomic_write

    out = Path(out)
    if out.exists() and not force:
        raise EdgekitError(f"{out} already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        files: List[Tuple[str, bytes]] = [(ROOT_NAME, root), *((f"{r}.json", seeds[r]) for r in SEED_ROLES if r in seeds),
                                          (TRUST_NAME, (json.dumps(trust_document(keys), indent=2) + "\n").encode())]
        for name, data in files:
            with atomic_write(tmp / name) as f:
                os.fchmod(f.fileno(), 0o644)
                f.write(data)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
