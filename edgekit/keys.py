"""Ed25519 key primitives shared by everything that signs or verifies (base layer).

``edgekit keygen`` writes the keys (``edgekit.ota.keys``); this module only loads them, names them and
checks signatures, so low layers (``edgekit.artifact``, the runtime) can verify without importing the OTA
layer.  A key's id is the sha256 of its raw 32-byte public key, in hex (the same id OTA manifests use).
Only ``cryptography`` is needed: a device verifies with no build tools.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgekit.errors import EdgekitError


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


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


__all__ = ["TrustedKey", "key_id", "load_private_key", "load_public_key"]
