"""Small shared helpers: atomic file writes, hashing and the one HOST:PORT parser every command uses."""
from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import tempfile
from pathlib import Path

from edgekit.errors import EdgekitError


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


def parse_host_port(text, option: str, *, listen: bool = False, example: str = "127.0.0.1:8080",
                    allow_port_zero: bool = False) -> tuple:
    """``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) -> (host, port) with the port in 1-65535; anything else is one
    EdgekitError line naming ``option``. Every command's address option goes through here (--http, --metrics,
    --mqtt, --grpc, --server), so they all take and refuse the same things.

    ``listen``: a server edgekit opens binds a literal IP address (127.0.0.1 unless you mean to expose it).
    ``allow_port_zero``: for library callers (tests) that let the system pick a free port; no command passes
    it, since a port nobody can know is no address to give a station or a fleet."""
    value = "" if text is None else str(text)
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    lowest = 0 if allow_port_zero else 1
    ok_port = port.isascii() and port.isdigit() and lowest <= int(port) <= 65535
    # '127.0.0.1:1883:9' or 'a b:1883' would otherwise reach a client as a host it retries forever
    ok_host = bool(host) and not any(c.isspace() or not c.isprintable() for c in host) and (bracketed or ":" not in host)
    if ok_host and bracketed:  # brackets hold an IPv6 address only ('[::1]]:80' passed as host '::1]')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            ok_host = False
    if not sep or not ok_host or not ok_port:
        raise EdgekitError(f"{option} {value!r}: give HOST:PORT, e.g. {example} (port 1-65535)")
    if listen:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise EdgekitError(f"{option} {value!r}: the host must be an IP address to listen on, e.g. "
                               f"{example}") from None
    return host, int(port)
