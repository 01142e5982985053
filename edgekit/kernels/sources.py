"""The digest that ties a built kernel (a cubin, a cpu-fused library) to the source it was built from."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def source_digest(path: Path) -> str:
    """SHA-256 of a kernel source and, recursively, of the local files it ``#include "..."``s (for a
    file without local includes, the plain SHA-256 of the file)."""
    path = Path(path)
    data = path.read_bytes()
    deps = [path.parent / name for name in _LOCAL_INCLUDE.findall(data.decode("utf-8", "replace"))]
    deps = [d for d in deps if d.is_file()]
    h = hashlib.sha256(data)
    if not deps:
        return h.hexdigest()
    for dep in deps:
        h.update(source_digest(dep).encode())
    return h.hexdigest()
