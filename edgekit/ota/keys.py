"""Ed25519 signing keys for OTA packages.

``edgekit keygen --out DIR`` writes ``DIR/private_key.pem`` (PKCS#8, unencrypted, mode 0600: keep it
on the build machine) and ``DIR/public_key.pem`` (SubjectPublicKeyInfo: copy it to the devices).
A key's id is the sha256 of its raw 32-byte public key, in hex; manifests name their signer by it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, Tuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.errors import EdgekitError
# the load/verify primitives live in the base layer, so artifacts and the runtime verify without the OTA layer
from edgekit.keys import TrustedKey, key_id, load_private_key, load_public_key  # noqa: F401  (re-exported)
from edgekit.utils import atomic_write

PRIVATE_KEY_NAME = "private_key.pem"
PUBLIC_KEY_NAME = "public_key.pem"


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
