"""Small shared helpers: atomic file writes and hashing."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask (reading it means setting it: put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_permissions(directory: bool = False) -> int:
    """What ``open()``/``mkdir()`` would give under the user's umask (mkstemp/mkdtemp give 0600/0700)."""
    return (0o777 if directory else 0o666) & ~current_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", permissions: int | None = None):
    """Write to a temporary file beside ``path``, fsync, then rename over it.

    A failure part-way leaves no partial file and whatever was at ``path`` before. The file gets
    ``permissions`` (default: what the user's umask gives a new file), set before anything is written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_permissions() if permissions is None else permissions)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
