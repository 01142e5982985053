"""Ed25519 signing keys for OTA packages.

``edgekit keygen --out DIR`` writes ``DIR/private_key.pem`` (PKCS#8, unencrypted, mode 0600: keep it
on the build machine) and ``DIR/public_key.pem`` (SubjectPublicKeyInfo: copy it to the devices).
A key's id is the sha256 of its raw 32-byte public key, in hex; manifests name their signer by it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Tuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgekit.errors import EdgekitError
from edgekit.utils import atomic_write

PRIVATE_KEY_NAME = "private_key.pem"
PUBLIC_KEY_NAME = "public_key.pem"


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_keypair(out_dir: str | os.PathLike, force: bool = False) -> Tuple[Path, Path, str]:
    """Write a new key pair into ``out_dir``; returns (private path, public path, key id)."""
    out_dir = Path(out_dir)
    private_path, public_path = out_dir / PRIVATE_KEY_NAME, out_dir / PUBLIC_KEY_NAME
    existing = [p for p in (private_path, public_path) if p.exists()]
    if existing and not force:
        raise EdgekitError(f"{existing[0]} already exists; use --force to replace the key pair "
                           "(packages signed with the old key will no longer verify against the new one)")
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
    public_pem = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        # created 0600 before the key is written, so the private key is never readable by others
        with atomic_write(private_path, permissions=0o600) as f:
            f.write(private_pem)
        with atomic_write(public_path) as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(public_pem)
    except OSError as e:
        raise EdgekitError(f"cannot write the key pair to {out_dir}: {e.strerror or e}") from None
    return private_path, public_path, key_id(private_key.public_key())


def _read_pem(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise EdgekitError(f"{what} file {path} not found")
    try:
        return path.read_bytes()
    except OSError as e:
        raise EdgekitError(f"cannot read {what} file {path}: {e.strerror}") from None


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    path = Path(path)
    data = _read_pem(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise EdgekitError(f"{path} is an encrypted private key; edgekit needs an unencrypted one") from None
    except ValueError:
        raise EdgekitError(f"{path} is not a PEM private key (use the private_key.pem from edgekit keygen)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgekitError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    path = Path(path)
    data = _read_pem(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise EdgekitError(f"{path} is not a PEM public key (use the public_key.pem from edgekit keygen)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise EdgekitError(f"{path} is not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    public_key: Ed25519PublicKey
    path: str

    def verifies(self, signature: bytes, message: bytes) -> bool:
        try:
            self.public_key.verify(signature, message)
            return True
        except InvalidSignature:
            return False


def load_trusted_keys(paths: Iterable[str | os.PathLike]) -> Dict[str, TrustedKey]:
    """The trusted key set, by key id, from public key files."""
    keys: Dict[str, TrustedKey] = {}
    for p in paths:
        public_key = load_public_key(p)
        kid = key_id(public_key)
        keys.setdefault(kid, TrustedKey(kid, public_key, str(p)))
    if not keys:
        raise EdgekitError("no trusted public key given (--pubkey)")
    return keys
