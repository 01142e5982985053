"""Artifact folders: model files plus a ``manifest.json`` that says what they are.

Every compiled model, whatever the backend, is one folder::

    model.onnx | model.xml + model.bin | ...     the files the backend loads
    manifest.json                                what, from where, how, and how well

The manifest records the model kind and config, input spec and preprocessing, the source
checkpoint's sha256, target and precision, tool versions, the sha256 of every model file, and
the parity figures measured against the source model at compile time, and optionally
``manifest.sig`` (``edgekit compile --sign KEY``): a detached Ed25519 signature over the manifest.
``verify_artifact`` checks the signature (when keys are trusted), the path rules and every file's hash
before a runner opens anything for execution, so a corrupted, replaced or out-of-folder file is refused
with one line first.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Dict, Iterator, Optional


from edgekit import __version__
from edgekit.errors import EdgekitError
# cryptography (edgekit.keys) and importlib.metadata are imported where they are used: a station that
# loads an unsigned artifact needs neither, and together they were 16 MiB and ~50 ms of its cold start.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgekit.keys import TrustedKey
from edgekit.utils import default_permissions, sha256_file

MANIFEST = "manifest.json"
FORMAT = "edgekit-artifact"
FORMAT_VERSION = 1


def tool_versions(*packages: str) -> Dict[str, str]:
    """edgekit's version and those of ``packages`` (the ones a backend declares it builds with)."""
    import importlib.metadata

    out = {"edgekit": __version__}
    for p in dict.fromkeys(packages):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[p] = importlib.metadata.version(p)
    return out


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def is_artifact(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def not_an_artifact(folder: str | os.PathLike) -> EdgekitError:
    """The one error every command gives for a folder, named as a model, that has no manifest."""
    return EdgekitError(f"{folder} is a folder without {MANIFEST}, so not an edgekit artifact (edgekit compile "
                        "writes those); give a checkpoint, an artifact folder or a model file (.onnx, .xml)")


def read_manifest(folder: str | os.PathLike, verify: bool = True) -> dict:
    """The manifest of an artifact folder; ``verify``: the hash-only checks of ``verify_artifact`` first
    (every file hashed, every named path one of them). ``verify=False`` only parses it (to describe or
    route a folder; nothing may be executed from it on that basis)."""
    if verify:
        return verify_artifact(folder, use_env=False).manifest
    folder = Path(folder)
    return _parse_manifest(folder, _read_manifest_bytes(folder))


def _read_manifest_bytes(folder: Path) -> bytes:
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise not_an_artifact(folder)
    try:
        data = _read_member(mpath, MAX_MANIFEST_BYTES)
    except _TooLarge:
        raise EdgekitError(f"{mpath}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not an edgekit manifest") from None
    except OSError as e:
        raise EdgekitError(f"{mpath}: cannot read it ({e.strerror or e})") from None
    return data


def _parse_manifest(folder: Path, data: bytes) -> dict:
    mpath = folder / MANIFEST
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise EdgekitError(f"{mpath}: corrupt manifest (not JSON)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EdgekitError(f"{mpath}: not an edgekit artifact manifest")
    return manifest


# --------------------------------------------------------------------------------------------------
# Authenticity: every file hashed in the manifest, the manifest signed (Ed25519, detached).
#
# The shape follows OpenSSF model signing (a manifest of every file's sha256, one signature over the
# manifest, verified before the model is loaded) and DSSE's rule of signing a typed payload (the
# signature covers a context string plus the manifest's exact bytes, so it cannot be replayed as a
# signature of anything else, e.g. an OTA package); the keys are edgekit keygen's Ed25519 keys
# (README "Artifacts: signing and verification" says why not the model-signing package itself).

SIGNATURE = "manifest.sig"
SIGNATURE_FORMAT = "edgekit-artifact-signature"
SIGNING_CONTEXT = b"edgekit-artifact-manifest-v1\n"
TRUSTED_KEYS_ENV = "EDGEKIT_TRUSTED_KEYS"
MAX_MANIFEST_BYTES = 16 << 20
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}\Z")
_RESERVED = {MANIFEST, SIGNATURE}


class _TooLarge(Exception):
    pass


def _read_member(path: Path, limit: Optional[int] = None) -> bytes:
    """A regular file's bytes, opened without following a symlink at its last component."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{path.name} is not a regular file")
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise _TooLarge()
    return data


def _sha256_fd(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{path.name} is not a regular file")
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_member_name(folder: Path, name, what: str = "file") -> Path:
    """``folder / name`` for a name the manifest gives, after the path rules: a plain relative POSIX path
    (no absolute path, no ``..``, no empty or ``.`` component, no backslash or NUL), not the manifest or
    its signature, and inside ``folder`` once every symlink is resolved (a symlink anywhere on the way is
    refused: the resolved path must be the literal one). ``folder`` must already be resolved."""
    if not isinstance(name, str) or not name:
        raise EdgekitError(f"{folder}: the manifest names a {what} that is not a file name: {name!r}")
    parts = name.split("/")
    if (name.startswith("/") or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in parts)
            or PurePosixPath(name).is_absolute()):
        raise EdgekitError(f"{folder}: the manifest names {what} {name!r}, which is not a plain relative path "
                           "inside the artifact folder (no absolute path, no '..')")
    if name in _RESERVED:
        raise EdgekitError(f"{folder}: the manifest names {name} as a {what}")
    literal = folder.joinpath(*parts)
    if os.path.realpath(literal) != str(literal):
        raise EdgekitError(f"{folder}: {name} leads outside the artifact folder or through a symlink; refused")
    return literal


class VerifiedArtifact:
    """An artifact folder whose manifest (and, with trusted keys, its signature) and every file's sha256
    have been checked.  Runners take files only through ``path`` (a hashed member) or ``read`` (its bytes,
    hashed again as read: the bytes checked are the bytes used)."""

    def __init__(self, folder: Path, manifest: dict, signed_by: Optional[str]):
        self.folder, self.manifest, self.signed_by = folder, manifest, signed_by

    def __fspath__(self) -> str:
        return str(self.folder)

    def __str__(self) -> str:
        return str(self.folder)

    def __repr__(self) -> str:
        return f"VerifiedArtifact({str(self.folder)!r}, signed_by={self.signed_by!r})"

    def member(self, name, what: str = "file") -> str:
        """``name`` checked to be one of the manifest's hashed files (the one gate every named path goes through)."""
        if not isinstance(name, str) or name not in self.manifest["files"]:
            raise EdgekitError(f"{self.folder}: the manifest names {what} {name!r}, which is not one of its hashed files")
        return name

    def path(self, name, what: str = "file") -> Path:
        return self.folder / self.member(name, what)

    def read(self, name, what: str = "file") -> bytes:
        name = self.member(name, what)
        try:
            data = _read_member(self.folder / name)
        except OSError as e:
            raise EdgekitError(f"{self.folder}: cannot read {name} ({e.strerror or e})") from None
        if hashlib.sha256(data).hexdigest() != self.manifest["files"][name]:
            raise EdgekitError(f"{self.folder}: {name} changed after it was verified; refused")
        return data


def trusted_keys_from_env() -> Optional[list]:
    """``EDGEKIT_TRUSTED_KEYS``: public key files (os.pathsep-separated) every artifact must be signed by
    one of; unset: no signature required (hash-only). Set but naming no file (empty, blanks, separators only:
    typically ``EDGEKIT_TRUSTED_KEYS=${UNSET_VARIABLE}`` in a unit file) is refused, not read as "no keys": a
    policy variable that is present must not silently turn signature checks off (fail closed)."""
    if TRUSTED_KEYS_ENV not in os.environ:
        return None
    keys = [p for p in os.environ[TRUSTED_KEYS_ENV].split(os.pathsep) if p.strip()]
    if not keys:
        raise EdgekitError(f"{TRUSTED_KEYS_ENV} is set but names no key file; set it to the public key files "
                           "artifacts must be signed by, or unset it for hash-only verification")
    return keys


def resolve_trusted_keys(trusted_keys) -> Dict[str, TrustedKey]:
    """{key id: TrustedKey} from public key files, loaded public keys, TrustedKeys or such a dict."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edgekit.keys import TrustedKey, key_id, load_public_key

    if isinstance(trusted_keys, dict):
        trusted_keys = list(trusted_keys.values())
    if isinstance(trusted_keys, (str, os.PathLike, Ed25519PublicKey, TrustedKey)):
        trusted_keys = [trusted_keys]
    keys: Dict[str, TrustedKey] = {}
    for k in trusted_keys:
        if isinstance(k, TrustedKey):
            keys.setdefault(k.key_id, k)
            continue
        pub = k if isinstance(k, Ed25519PublicKey) else load_public_key(k)
        kid = key_id(pub)
        keys.setdefault(kid, TrustedKey(kid, pub, "" if isinstance(k, Ed25519PublicKey) else str(k)))
    if not keys:
        raise EdgekitError("an empty set of trusted keys was given: nothing could be verified")
    return keys


def _check_signature(folder: Path, manifest_bytes: bytes, keys: Dict[str, TrustedKey]) -> str:
    spath = folder / SIGNATURE
    if not spath.exists() and not spath.is_symlink():
        raise EdgekitError(f"{folder}: unsigned artifact (no {SIGNATURE}), and trusted keys are required: "
                           "refused before anything is loaded (sign it with edgekit compile --sign KEY)")
    try:
        doc = json.loads(_read_member(spath, 1 << 16))
        kid, sig = doc["key_id"], base64.b64decode(doc["signature"], validate=True)
        if doc.get("format") != SIGNATURE_FORMAT or not isinstance(kid, str):
            raise ValueError
    except (OSError, _TooLarge, ValueError, KeyError, TypeError, UnicodeDecodeError, binascii.Error):
        raise EdgekitError(f"{folder}: {SIGNATURE} is not an edgekit artifact signature; refused") from None
    key = keys.get(kid)
    if key is None:
        raise EdgekitError(f"{folder}: signed by key {kid[:16]}..., which is not a trusted key; refused before "
                           "anything is loaded")
    if not key.verifies(sig, SIGNING_CONTEXT + manifest_bytes):
        raise EdgekitError(f"{folder}: the signature does not match {MANIFEST} (modified after signing); refused")
    return kid


def verify_artifact(folder: str | os.PathLike, trusted_keys=None, *, use_env: bool = True) -> VerifiedArtifact:
    """Check an artifact folder before anything in it is opened for execution; one error line otherwise.

    Order: the manifest's bytes are read once; with trusted keys (``trusted_keys``, else with ``use_env``
    the files in ``EDGEKIT_TRUSTED_KEYS``) its detached signature over exactly those bytes must verify with
    one of them (an unsigned artifact or another key is refused); the ``files`` map is mandatory and
    every name in it obeys ``check_member_name``; the folder holds nothing else (a backend may open a
    file beside its model implicitly, e.g. OpenVINO's .bin or ONNX external data); every file's sha256
    matches; every other path the manifest names (``model_file``, ``extra_files``, cpu-fused libraries)
    is one of those files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgekitError(f"model not found: {folder}" if not folder.exists() else f"{folder}: not an artifact folder")
    folder = Path(os.path.realpath(folder))
    manifest_bytes = _read_manifest_bytes(folder)
    if trusted_keys is None and use_env:
        trusted_keys = trusted_keys_from_env()
    signed_by = None
    if trusted_keys is not None:
        signed_by = _check_signature(folder, manifest_bytes, resolve_trusted_keys(trusted_keys))
    manifest = _parse_manifest(folder, manifest_bytes)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise EdgekitError(f"{folder}: the manifest has no 'files' map of sha256 hashes; refused")
    paths = {}
    for name, digest in files.items():
        paths[name] = check_member_name(folder, name)
        if not isinstance(digest, str) or not _SHA256_HEX.match(digest):
            raise EdgekitError(f"{folder}: the manifest's sha256 of {name} is not a sha256 hex digest")
    for f in folder.rglob("*"):
        rel = f.relative_to(folder).as_posix()
        if f.is_dir() and not f.is_symlink():
            continue
        if rel not in files and rel not in _RESERVED:
            raise EdgekitError(f"{folder}: {rel} is in the folder but not among the manifest's hashed files; refused")
    for name, digest in files.items():
        f = paths[name]
        if not f.exists():
            raise EdgekitError(f"{folder}: file {name} listed in the manifest is missing")
        try:
            actual = _sha256_fd(f)
        except OSError as e:
            raise EdgekitError(f"{folder}: cannot read {name} ({e.strerror or e})") from None
        if actual != digest:
            raise EdgekitError(f"{folder}: {name} does not match its sha256 in the manifest (corrupt or replaced)")
    verified = VerifiedArtifact(folder, manifest, signed_by)
    for name in named_paths(manifest):
        verified.member(name[1], name[0])
    return verified


def named_paths(manifest: dict):
    """(what, name) for every path a manifest names outside its ``files`` map."""
    if "model_file" in manifest:
        yield "model_file", manifest["model_file"]
    extra = manifest.get("extra_files", [])
    for name in extra if isinstance(extra, list) else [extra]:
        yield "extra_files entry", name
    kernels = manifest.get("kernels")
    libs = kernels.get("libraries", {}) if isinstance(kernels, dict) else {}
    if not isinstance(libs, dict):
        raise EdgekitError("the manifest's kernels.libraries is not a map")
    for isa, lib in libs.items():
        yield f"kernel library ({isa})", lib.get("file") if isinstance(lib, dict) else lib


def sign_artifact(folder: str | os.PathLike, private_key: Ed25519PrivateKey) -> dict:
    """Write ``manifest.sig``: a detached Ed25519 signature over the manifest's exact bytes (which hold
    every file's sha256), checked first (hash-only) so only a consistent folder gets signed."""
    from edgekit.keys import key_id

    verified = verify_artifact(folder, use_env=False)
    data = _read_manifest_bytes(verified.folder)
    doc = {"format": SIGNATURE_FORMAT, "format_version": 1, "signed": MANIFEST,
           "manifest_sha256": hashlib.sha256(data).hexdigest(), "algorithm": "ed25519",
           "key_id": key_id(private_key.public_key()),
           "signature": base64.b64encode(private_key.sign(SIGNING_CONTEXT + data)).decode()}
    (verified.folder / SIGNATURE).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def check_out(out: str | os.PathLike, force: bool = False) -> None:
    """Refuse an output folder before any work starts (``artifact_writer`` checks again at the end)."""
    out = Path(out)
    if out.exists() and not force:
        raise EdgekitError(f"{out} already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise EdgekitError(f"{out} exists and is not a folder")


@contextlib.contextmanager
def artifact_writer(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out`` in one rename.

    A failure leaves no partial folder, and an existing ``out`` untouched (replaced only with
    ``force``, and only once the new one is complete).
    """
    out = Path(out)
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, default_permissions(directory=True))  # mkdtemp makes it 0700; the user's umask decides
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: dict, model_files) -> dict:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": now_utc(), **manifest}
    manifest["files"] = {name: sha256_file(folder / name) for name in model_files}
    manifest["size_bytes"] = sum((folder / n).stat().st_size for n in model_files)
    (folder / SIGNATURE).unlink(missing_ok=True)  # a signature of the previous manifest would no longer verify
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
