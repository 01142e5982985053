"""Over-the-air adapter packages: adapter folders, signing keys, signed packages, atomic install.

Build side: ``save_adapter`` -> ``generate_keypair`` -> ``build_package``.
Device side: ``verify_package`` -> ``install_package`` / ``rollback``; the runtime asks
``installed(root)`` or ``active_adapter_dir(root)`` (which first recovers a stale trial) and loads with
``load_adapter``. The install root's state itself (trial, committed, blocked, pinned) is ``edgekit.device.state``.
Needs ``cryptography`` and ``safetensors``, both part of the runtime (``pip install edgekit``; the ``ota``
extra still names them); no torch.
"""
from edgekit.mlff.adapter import load_adapter, read_adapter_meta, save_adapter
from edgekit.ota.install import (active_adapter_dir, install_package, installed, load_installed_adapter,
                                 read_state, rollback)
from edgekit.ota.keys import generate_keypair, key_id, load_trusted_keys
from edgekit.ota.package import DEFAULT_MAX_SIZE, VerifiedPackage, build_package, verify_package
from edgekit.mlff.version import parse_version

__all__ = [
    "save_adapter", "load_adapter", "read_adapter_meta",
    "generate_keypair", "key_id", "load_trusted_keys",
    "build_package", "verify_package", "VerifiedPackage", "DEFAULT_MAX_SIZE", "parse_version",
    "install_package", "rollback", "installed", "active_adapter_dir", "load_installed_adapter", "read_state",
]
