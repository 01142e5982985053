"""Signed OTA packages: build one from an adapter folder, and verify one before anything trusts it.

A package is a zip archive::

    manifest.json              what the package is (below)
    manifest.sig               the 64-byte raw Ed25519 signature of manifest.json
    payload/adapter.json       the adapter folder's files (see edgekit.mlff.adapter)
    payload/adapter.safetensors
    payload/health.safetensors optional: sample images and the adapter's outputs on them at packaging
                               time (edgekit.fleet.health), for the device's health check
    (zip comment)              the file seal: MAGIC, the signer's raw key id (32 bytes) and the Ed25519
                               signature (64 bytes, the file's last bytes) of every byte before it

The seal binds the exact file: the signature covers every byte of the archive (local headers, data,
central directory, end record and the start of the comment) except the signature itself, so one byte
added, removed or changed anywhere makes verification fail. It is checked first, before the zip is
parsed; manifest.sig is kept so the manifest stays verifiable on its own.

``manifest.json``: format, format_version, task, classes, version, backbone, backbone_sha256, input,
created_utc, key_id (the signer's key id), files: [{name, sha256, size}] for every payload file and,
with sample images, health: {file, images, ...}. Format version 1 (no seal) is refused.

Why zip rather than tar.gz: the zip central directory lists every member's name, type and size
before anything is decompressed, so the verifier rejects unsafe paths, links, devices and
oversized content up front and then decompresses each member on its own, bounded by its declared
size (zipfile stops there and checks the CRC); the signature is checked on manifest.json before
any payload is read. A tar.gz must be inflated sequentially just to list its members, and tar has
many more member kinds (hard/symbolic links, devices, fifos, sparse and pax entries) to rule out.
Members are stored with a fixed timestamp and mode; nothing is ever extracted by zipfile itself.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional

from edgekit import __version__
from edgekit.errors import EdgekitError
from edgekit.mlff.adapter import (META_NAME, adapter_files, is_plain_file_name, is_sha256, load_adapter_arrays,
                                 load_weights_bytes, validate_adapter_meta)
from edgekit.mlff.names import RULE as NAME_RULE, is_safe_name
from edgekit.ota.keys import TrustedKey, key_id, load_private_key, load_trusted_keys
from edgekit.mlff.version import parse_version
from edgekit.utils import atomic_write

PACKAGE_FORMAT = "edgekit-ota-package"
PACKAGE_FORMAT_VERSION = 2  # 2: the file seal; version 1 packages are refused (their bytes were not bound)
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
PAYLOAD_PREFIX = "payload/"
DEFAULT_MAX_SIZE = 16 * 1024 * 1024  # bytes; applies to the archive and to its total unpacked size
MAX_MANIFEST_SIZE = 1024 * 1024
MAX_MEMBERS = 256
SIGNATURE_SIZE = 64
# The manifest fields copied from adapter.json; verify checks the two still agree.
ADAPTER_FIELDS = ("task", "classes", "backbone", "backbone_sha256", "input")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
SEAL_MAGIC = b"edgekit-seal-v1\n"  # 16 bytes
SEAL_SIZE = len(SEAL_MAGIC) + 32 + SIGNATURE_SIZE
HEALTH_NAME = "health.safetensors"
# Package kinds: an MLFF adapter (the default, no "kind" field) or a compiled backbone artifact folder.
ADAPTER_KIND, BACKBONE_KIND = "adapter", "backbone"
BACKBONE_MAX_SIZE = 512 * 1024 * 1024  # a compiled backbone (e.g. EfficientNet-Lite0 fp32 ONNX, ~14 MB) is larger
ARTIFACT_MANIFEST = "manifest.json"  # the artifact's own manifest, as payload/manifest.json


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def manifest_to_bytes(manifest: Mapping) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _zip_member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # unix, so external_attr below is read as a mode
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def seal_archive(archive: bytes, private_key) -> bytes:
    """The zip ``archive`` (no comment) with its seal as the zip comment: the signature of every byte before it."""
    buf = io.BytesIO(archive)
    with zipfile.ZipFile(buf, "a") as zf:  # rewrites the end record with the comment's length
        zf.comment = SEAL_MAGIC + _raw_key_id(private_key.public_key()) + bytes(SIGNATURE_SIZE)
    data = buf.getvalue()
    if not data.endswith(bytes(SIGNATURE_SIZE)):
        raise EdgekitError("internal error: the package seal is not at the end of the archive")
    return data[:-SIGNATURE_SIZE] + private_key.sign(data[:-SIGNATURE_SIZE])


def _raw_key_id(public_key) -> bytes:
    return bytes.fromhex(key_id(public_key))


def build_package(adapter_dir: str | os.PathLike, private_key_path: str | os.PathLike, version: str,
                  out: str | os.PathLike, health: Optional[bytes] = None,
                  health_info: Optional[Mapping] = None) -> dict:
    """Sign the adapter folder as package ``out`` (written atomically); returns the manifest.

    ``health``: the bytes of a health.safetensors (``edgekit.fleet.health.record_health``) shipped with it,
    described by ``health_info`` in the manifest.
    """
    parse_version(version)
    adapter_dir = Path(adapter_dir)
    arrays, meta = load_adapter_arrays(adapter_dir)  # loads the weights too: never ship an adapter that does not load
    if meta.get("drift"):
        from edgekit.mlff.drift import DriftScorer

        DriftScorer.from_adapter(arrays, {**meta, "folder": str(adapter_dir)})  # nor drift statistics that do not
    if meta.get("version") is not None and meta["version"] != version:
        raise EdgekitError(f"{adapter_dir / META_NAME} says version {meta['version']}, but --version is {version}")
    private_key = load_private_key(private_key_path)
    payload = {name: (adapter_dir / name).read_bytes() for name in adapter_files(meta)}
    if health is not None:
        payload[HEALTH_NAME] = health
    manifest = {
        "format": PACKAGE_FORMAT, "format_version": PACKAGE_FORMAT_VERSION,
        **{k: meta[k] for k in ADAPTER_FIELDS},
        "version": version,
        "created_utc": utc_now(),
        "created_by": f"edgekit {__version__}",
        "key_id": key_id(private_key.public_key()),
        "files": [{"name": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                  for name, data in payload.items()],
    }
    if health is not None:
        manifest["health"] = {"file": HEALTH_NAME, **dict(health_info or {})}
    _write_sealed(manifest, payload, private_key, out)
    return manifest


def build_backbone_package(artifact_dir: str | os.PathLike, private_key_path: str | os.PathLike, version: str,
                           out: str | os.PathLike) -> dict:
    """Sign a compiled MLFF backbone artifact folder as a package, so that devices receive their backbone
    through the same TUF repository, and the same two checks, as their adapters (target
    ``backbones/<backbone id>.zip``). The payload is the artifact's manifest.json and every file it hashes
    (plus its detached signature files ``*.sig``, if any), all plain names."""
    from edgekit.artifact import read_manifest
    from edgekit.mlff.names import check_name

    parse_version(version)
    folder = Path(artifact_dir)
    art = read_manifest(folder)  # every file's sha256 checked: never ship a folder that does not verify
    model = art.get("model") or {}
    if model.get("kind") != "mlff-backbone":
        raise EdgekitError(f"{folder} is a {model.get('kind')!r} artifact; only compiled MLFF backbones "
                           "(edgekit compile REGISTRY --target onnx|openvino) are shipped as backbone packages")
    name = check_name(model.get("backbone"), "backbone name")
    if not is_sha256(model.get("backbone_sha256")):
        raise EdgekitError(f"{folder}: the manifest records no backbone_sha256")
    names = [ARTIFACT_MANIFEST, *sorted(art.get("files") or {}),
             *sorted(p.name for p in folder.iterdir() if p.name.endswith(".sig") and p.is_file())]
    for n in names:
        if not is_plain_file_name(n):
            raise EdgekitError(f"{folder}: file {n!r} is not a plain file name in the artifact's folder; backbone "
                               "packages carry flat artifacts only")
    private_key = load_private_key(private_key_path)
    payload = {n: (folder / n).read_bytes() for n in dict.fromkeys(names)}
    manifest = {
        "format": PACKAGE_FORMAT, "format_version": PACKAGE_FORMAT_VERSION, "kind": BACKBONE_KIND,
        "backbone": name, "backbone_sha256": model["backbone_sha256"], "target": art.get("target"),
        "precision": art.get("precision"), "version": version, "created_utc": utc_now(),
        "created_by": f"edgekit {__version__}", "key_id": key_id(private_key.public_key()),
        "files": [{"name": n, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in payload.items()],
    }
    _write_sealed(manifest, payload, private_key, out)
    return manifest


def _write_sealed(manifest: dict, payload: Mapping[str, bytes], private_key, out: str | os.PathLike) -> None:
    manifest_bytes = manifest_to_bytes(manifest)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(_zip_member(MANIFEST_NAME), manifest_bytes)
        zf.writestr(_zip_member(SIGNATURE_NAME), private_key.sign(manifest_bytes))
        for name, data in payload.items():
            zf.writestr(_zip_member(PAYLOAD_PREFIX + name), data)
    sealed = seal_archive(buf.getvalue(), private_key)
    try:
        with atomic_write(out) as f:
            f.write(sealed)
    except OSError as e:
        raise EdgekitError(f"cannot write {out}: {e.strerror or e}") from None


@dataclass
class VerifiedPackage:
    """A package whose signature, signer, members and payload hashes all checked out."""

    path: Path
    archive_size: int
    manifest: dict
    manifest_bytes: bytes
    signature: bytes
    files: Dict[str, bytes]  # payload file name -> content, exactly as hashed
    signer: TrustedKey

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", ADAPTER_KIND)

    @property
    def name(self) -> str:
        """What the package is for: the task of an adapter, the backbone name of a backbone."""
        return self.manifest["backbone"] if self.kind == BACKBONE_KIND else self.manifest["task"]

    def summary(self) -> dict:
        m = self.manifest
        if self.kind == BACKBONE_KIND:
            return {"package": str(self.path), "verified": True, "kind": BACKBONE_KIND, "version": m["version"],
                    "backbone": m["backbone"], "backbone_sha256": m["backbone_sha256"], "target": m.get("target"),
                    "precision": m.get("precision"), "created_utc": m["created_utc"], "key_id": m["key_id"],
                    "key_file": self.signer.path, "archive_size": self.archive_size, "files": m["files"]}
        return {"package": str(self.path), "verified": True, "version": m["version"], "task": m["task"],
                "classes": m["classes"], "backbone": m["backbone"], "backbone_sha256": m["backbone_sha256"],
                "input": m["input"], "created_utc": m["created_utc"], "key_id": m["key_id"],
                "key_file": self.signer.path, "archive_size": self.archive_size, "files": m["files"]}


def _member_kind(info: zipfile.ZipInfo) -> Optional[str]:
    """None for a regular file, else what the member is."""
    if info.is_dir():
        return "a directory"
    mode = info.external_attr >> 16 if info.create_system == 3 else 0
    if stat.S_IFMT(mode) in (0, stat.S_IFREG):  # no type bits: a plain file (e.g. Python's writestr)
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    return "not a regular file"


def _is_safe_member_name(name: str) -> bool:
    if not name or len(name) > 255 or "\\" in name or "\x00" in name or ":" in name or name.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _check_members(zf: zipfile.ZipFile, where: str, max_size: int) -> Dict[str, zipfile.ZipInfo]:
    """Every member a plain relative regular file, once, readable, and the total within ``max_size``."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise EdgekitError(f"{where} has {len(infos)} members, more than the {MAX_MEMBERS} a package may have")
    members: Dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        name = info.filename
        if not _is_safe_member_name(name):
            raise EdgekitError(f"{where}: unsafe member path {name!r} (absolute, '..' or odd characters); refused")
        kind = _member_kind(info)
        if kind:
            raise EdgekitError(f"{where}: member {name!r} is {kind}; only regular files are allowed")
        if name in members:
            raise EdgekitError(f"{where}: member {name!r} appears twice")
        if info.flag_bits & 0x1:
            raise EdgekitError(f"{where}: member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise EdgekitError(f"{where}: member {name!r} uses an unsupported compression method")
        total += info.file_size
        members[name] = info
    if total > max_size:
        raise EdgekitError(f"{where} would unpack to {total:,} bytes, over the {max_size:,}-byte size limit "
                           "(--max-size)")
    return members


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> bytes:
    try:
        data = zf.read(info)  # bounded by the declared size; zipfile checks the CRC
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as e:
        raise EdgekitError(f"{where}: member {info.filename!r} is corrupt ({e})") from None
    if len(data) != info.file_size:
        raise EdgekitError(f"{where}: member {info.filename!r} is corrupt (size differs from its header)")
    return data


def _claimed_key_id(manifest_bytes: bytes) -> Optional[str]:
    try:
        kid = json.loads(manifest_bytes).get("key_id")
    except (ValueError, AttributeError):
        return None
    return kid if is_sha256(kid) else None


def _check_signature(manifest_bytes: bytes, signature: bytes, trusted: Mapping[str, TrustedKey],
                     where: str) -> TrustedKey:
    """The trusted key that signed these exact manifest bytes, or one clear refusal."""
    if len(signature) == SIGNATURE_SIZE:
        for key in trusted.values():
            if key.verifies(signature, manifest_bytes):
                return key
    claimed = _claimed_key_id(manifest_bytes)
    if claimed and claimed not in trusted:
        raise EdgekitError(f"{where} is signed by unknown key {claimed[:16]}…, not one of the {len(trusted)} "
                           "trusted key(s) given with --pubkey")
    raise EdgekitError(f"{where}: bad signature: manifest.json was altered or not signed by a trusted key")


def _check_seal(data: bytes, trusted: Mapping[str, TrustedKey], where: str) -> TrustedKey:
    """The trusted key whose signature covers every byte of the file before the signature itself."""
    magic_at = len(data) - SEAL_SIZE
    if len(data) < SEAL_SIZE + 22 or data[magic_at:magic_at + len(SEAL_MAGIC)] != SEAL_MAGIC:
        if data[:2] != b"PK":
            raise EdgekitError(f"{where} is not an edgekit package (not a zip archive)")
        raise EdgekitError(f"{where}: bad signature: the file has no edgekit seal at its end (altered, or an "
                           "unsealed format-1 package: re-package it with this edgekit)")
    claimed = data[magic_at + len(SEAL_MAGIC):len(data) - SIGNATURE_SIZE].hex()
    key = trusted.get(claimed)
    if key is None:
        raise EdgekitError(f"{where} is signed by unknown key {claimed[:16]}…, not one of the {len(trusted)} "
                           "trusted key(s) given with --pubkey")
    if not key.verifies(data[-SIGNATURE_SIZE:], data[:-SIGNATURE_SIZE]):
        raise EdgekitError(f"{where}: bad signature: the file was altered after signing (its seal does not "
                           "verify)")
    return key


def _parse_manifest(manifest_bytes: bytes, where: str) -> dict:
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError:
        raise EdgekitError(f"{where}: manifest.json is not valid JSON") from None

    def need(cond: bool, what: str):
        if not cond:
            raise EdgekitError(f"{where}: manifest.json {what}")

    need(isinstance(manifest, dict), "is not a JSON object")
    need(manifest.get("format") == PACKAGE_FORMAT, f"format is {manifest.get('format')!r}, not {PACKAGE_FORMAT!r}")
    fv = manifest.get("format_version")
    need(isinstance(fv, int) and fv <= PACKAGE_FORMAT_VERSION,
         f"format_version {fv!r} is newer than this edgekit reads ({PACKAGE_FORMAT_VERSION}); upgrade edgekit")
    need(fv == PACKAGE_FORMAT_VERSION, f"format_version {fv!r} is no longer accepted (its file bytes are not bound "
         "by the signature); re-package it with this edgekit")
    parse_version(manifest.get("version"))
    need(manifest.get("kind", ADAPTER_KIND) in (ADAPTER_KIND, BACKBONE_KIND), f"kind {manifest.get('kind')!r} is unknown")
    if manifest.get("kind") == BACKBONE_KIND:
        need(is_safe_name(manifest.get("backbone")), f"backbone name {manifest.get('backbone')!r} must be {NAME_RULE}")
        need(is_sha256(manifest.get("backbone_sha256")), "has no valid backbone_sha256")
    else:
        need(is_safe_name(manifest.get("task")), f"task {manifest.get('task')!r} must be {NAME_RULE}")
    need(is_sha256(manifest.get("key_id")), "has no valid key_id")
    need(isinstance(manifest.get("created_utc"), str), "has no created_utc")
    files = manifest.get("files")
    need(isinstance(files, list) and files, "lists no payload files")
    for entry in files:
        need(isinstance(entry, dict) and is_plain_file_name(entry.get("name")) and is_sha256(entry.get("sha256"))
             and isinstance(entry.get("size"), int) and entry["size"] >= 0,
             f"has a malformed files entry {entry!r}")
    names = [e["name"] for e in files]
    need(len(set(names)) == len(names), "lists a payload file twice")
    health = manifest.get("health")
    need(health is None or (isinstance(health, dict) and health.get("file") == HEALTH_NAME and HEALTH_NAME in names),
         "has a malformed health entry")
    need(health is not None or HEALTH_NAME not in names, f"lists {HEALTH_NAME} without a health entry")
    return manifest


def verify_package(path: str | os.PathLike, trusted_keys: Mapping[str, TrustedKey] | Iterable[str | os.PathLike],
                   max_size: int = DEFAULT_MAX_SIZE, kind: Optional[str] = ADAPTER_KIND) -> VerifiedPackage:
    """Check everything about a package, in memory, without writing anywhere.

    ``trusted_keys``: the result of ``load_trusted_keys`` or public key file paths. Order: size
    limits, member safety, signature by a trusted key, key id, payload hashes, adapter contents.
    ``kind``: the package kind the caller expects (``None``: any); another kind is refused in one line.
    """
    path = Path(path)
    where = path.name
    trusted = trusted_keys if isinstance(trusted_keys, Mapping) else load_trusted_keys(trusted_keys)
    if not path.is_file():
        raise EdgekitError(f"package {path} not found")
    size = path.stat().st_size
    if size > max_size:
        raise EdgekitError(f"{where} is {size:,} bytes, over the {max_size:,}-byte size limit (--max-size)")
    with open(path, "rb") as f:
        data = f.read(max_size + 1)  # one read: the bytes checked are the bytes installed
    if len(data) > max_size:
        raise EdgekitError(f"{where} grew past the {max_size:,}-byte size limit while being read")
    sealed_by = _check_seal(data, trusted, where)  # before anything parses the archive
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError):
        raise EdgekitError(f"{where} is not an edgekit package (not a zip archive)") from None

    with zf:
        if zf.comment != data[-SEAL_SIZE:]:
            raise EdgekitError(f"{where}: the seal is not the archive's comment; refused")
        members = _check_members(zf, where, max_size)
        for required in (MANIFEST_NAME, SIGNATURE_NAME):
            if required not in members:
                raise EdgekitError(f"{where} has no {required}: not a signed edgekit package")
        if members[MANIFEST_NAME].file_size > MAX_MANIFEST_SIZE:
            raise EdgekitError(f"{where}: manifest.json is implausibly large")
        manifest_bytes = _read_member(zf, members[MANIFEST_NAME], where)
        signature = _read_member(zf, members[SIGNATURE_NAME], where)
        signer = _check_signature(manifest_bytes, signature, trusted, where)
        if signer.key_id != sealed_by.key_id:
            raise EdgekitError(f"{where}: manifest.sig and the file seal are by different keys")
        manifest = _parse_manifest(manifest_bytes, where)
        got = manifest.get("kind", ADAPTER_KIND)
        if kind is not None and got != kind:
            raise EdgekitError(f"{where} is a {got} package, not an {kind} package" if kind == ADAPTER_KIND else
                               f"{where} is an {got} package, not a {kind} package")
        if manifest["key_id"] != signer.key_id:
            raise EdgekitError(f"{where}: manifest names key {manifest['key_id'][:16]}… but was signed by "
                               f"{signer.key_id[:16]}…")

        expected = {MANIFEST_NAME, SIGNATURE_NAME} | {PAYLOAD_PREFIX + e["name"] for e in manifest["files"]}
        unlisted, missing = sorted(set(members) - expected), sorted(expected - set(members))
        if unlisted:
            raise EdgekitError(f"{where}: member {unlisted[0]!r} is not listed in the manifest")
        if missing:
            raise EdgekitError(f"{where}: payload file {missing[0]!r} listed in the manifest is missing")
        files: Dict[str, bytes] = {}
        for entry in manifest["files"]:
            content = _read_member(zf, members[PAYLOAD_PREFIX + entry["name"]], where)
            if len(content) != entry["size"] or hashlib.sha256(content).hexdigest() != entry["sha256"]:
                raise EdgekitError(f"{where}: payload file {entry['name']!r} does not match its sha256 in the "
                                   "manifest (tampered or corrupted)")
            files[entry["name"]] = content

    if manifest.get("kind") == BACKBONE_KIND:
        _check_backbone_payload(manifest, files, where)
    else:
        _check_adapter_payload(manifest, files, where)
    return VerifiedPackage(path=path, archive_size=size, manifest=manifest, manifest_bytes=manifest_bytes,
                           signature=signature, files=files, signer=signer)


def _check_adapter_payload(manifest: dict, files: Dict[str, bytes], where: str) -> None:
    """The signed payload is a loadable adapter that agrees with its manifest."""
    if META_NAME not in files:
        raise EdgekitError(f"{where}: the payload has no {META_NAME}")
    try:
        meta = json.loads(files[META_NAME])
    except ValueError:
        raise EdgekitError(f"{where}: payload {META_NAME} is not valid JSON") from None
    meta = validate_adapter_meta(meta, f"{where}: payload {META_NAME}")
    expected = sorted(adapter_files(meta) + ([HEALTH_NAME] if manifest.get("health") else []))
    if expected != sorted(files):
        raise EdgekitError(f"{where}: payload files {sorted(files)} differ from those {META_NAME} names "
                           f"{expected}")
    for field in ADAPTER_FIELDS:
        if manifest.get(field) != meta.get(field):
            raise EdgekitError(f"{where}: manifest and payload {META_NAME} disagree on {field!r}")
    if meta.get("version") is not None and meta["version"] != manifest["version"]:
        raise EdgekitError(f"{where}: manifest and payload {META_NAME} disagree on 'version'")
    for name in meta["weights"] + ([HEALTH_NAME] if manifest.get("health") else []):
        load_weights_bytes(name, files[name])
    if meta.get("drift"):  # the drift statistics load, and agree with adapter.json, or the package is refused
        from edgekit.mlff.drift import DriftScorer

        name = meta["drift"]["file"]
        try:
            DriftScorer.from_arrays(load_weights_bytes(name, files[name]), meta["drift"])
        except EdgekitError as e:
            raise EdgekitError(f"{where}: {e}") from None


def _check_backbone_payload(manifest: dict, files: Dict[str, bytes], where: str) -> None:
    """The signed payload is a complete MLFF backbone artifact that agrees with the package manifest."""
    if ARTIFACT_MANIFEST not in files:
        raise EdgekitError(f"{where}: the backbone payload has no {ARTIFACT_MANIFEST}")
    try:
        art = json.loads(files[ARTIFACT_MANIFEST])
    except (ValueError, UnicodeDecodeError):
        raise EdgekitError(f"{where}: the backbone payload's {ARTIFACT_MANIFEST} is not JSON") from None
    model = art.get("model") if isinstance(art, dict) else None
    if not isinstance(model, dict) or model.get("kind") != "mlff-backbone":
        raise EdgekitError(f"{where}: the payload is not an MLFF backbone artifact")
    if (model.get("backbone"), model.get("backbone_sha256")) != (manifest["backbone"], manifest["backbone_sha256"]):
        raise EdgekitError(f"{where}: the package and its artifact disagree on the backbone")
    hashed = art.get("files")
    if not isinstance(hashed, dict) or not hashed:
        raise EdgekitError(f"{where}: the artifact's manifest hashes no files")
    for name, digest in hashed.items():
        if name not in files or hashlib.sha256(files[name]).hexdigest() != digest:
            raise EdgekitError(f"{where}: artifact file {name!r} is missing or differs from its sha256")
    extra = sorted(set(files) - set(hashed) - {ARTIFACT_MANIFEST} - {n for n in files if n.endswith(".sig")})
    if extra:
        raise EdgekitError(f"{where}: payload file {extra[0]!r} is not one of the artifact's files")
