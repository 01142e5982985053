"""Names that end up in paths: task names and backbone names.

A task name becomes part of a registry folder (``adapters/NN-<task>``), of a TUF target path
(``adapters/<task>.<backbone>.zip``) and of the file names ``package`` and ``repo add`` write; a backbone
name becomes a target path (``backbones/<name>.zip``). So both are one path component from a small
character set: letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit (so never ``.`` or
``..``), at most 64 characters. Checked wherever a name comes in: ``adapt``, the adapter format (so
``package``, ``verify``, ``install``, ``repo add`` and ``update`` refuse a signed package that carries
another), ``update --task`` and the device trust bundle's scopes.
"""
from __future__ import annotations

import re
from typing import Any

from edgekit.errors import EdgekitError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
RULE = "one path component of letters, digits, '.', '_' or '-', starting with a letter or digit, at most 64"


def is_safe_name(name: Any) -> bool:
    return isinstance(name, str) and bool(_NAME_RE.match(name))


def check_name(name: Any, what: str = "task name") -> str:
    """``name`` when it is safe as one path component; one error line otherwise."""
    if not is_safe_name(name):
        raise EdgekitError(f"{what} {name!r}: must be {RULE}")
    return name
