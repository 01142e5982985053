"""One image handed from an input (watch folder, HTTP) to the station's worker."""
from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class Job:
    key: str            # identity used for dedupe: "watch:<relative path>:<size>:<mtime_ns>" or "http:<uuid4>"
    source: str         # "watch" | "http"
    name: str           # file name or the HTTP upload's name (shown in results)
    path: Optional[Path] = None     # watch: the file (read by the worker)
    data: Optional[bytes] = None    # http: the encoded image bytes
    received: float = field(default_factory=time.time)   # wall clock when the input saw it
    reply: Optional[concurrent.futures.Future] = None    # http: set_result(result dict) after the commit
