"""What an input hands the station: one image to inspect."""
from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class Job:
    """One image. ``key`` is its identity for dedupe (a result row per key, ever): ``watch:<relative path>:<size>:
    <mtime_ns>`` for a file, ``http:<uuid4>`` for an upload. A watch job carries ``path`` (the worker reads the
    file), an HTTP job ``data`` (the encoded bytes) and ``reply``, a future the worker completes with the result
    dict once it is committed."""

    key: str
    source: str  # "watch" | "http"
    name: str  # file name or the upload's name (shown in results)
    path: Optional[Path] = None
    data: Optional[bytes] = None
    received: float = field(default_factory=time.time)  # wall clock when the input saw it
    reply: Optional[concurrent.futures.Future] = None
