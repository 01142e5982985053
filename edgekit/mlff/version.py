"""Adapter versions: strict MAJOR.MINOR.PATCH, compared numerically (1.10.0 > 1.9.0).

No leading zeros and no pre-release tags: every version has exactly one spelling, so the
version string can name a folder on the device and equal versions are equal strings.
"""
from __future__ import annotations

import re
from typing import Tuple

from edgekit.errors import EdgekitError

_VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\Z")


def parse_version(text) -> Tuple[int, int, int]:
    """``"1.2.3"`` -> ``(1, 2, 3)``; one clear error for anything else."""
    m = _VERSION_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise EdgekitError(f"invalid version {text!r}: expected MAJOR.MINOR.PATCH with plain numbers, e.g. 1.2.3")
    return tuple(int(p) for p in m.groups())
