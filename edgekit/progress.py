"""Progress bars on stderr (tqdm); quiet when disabled, in CI, or when stderr is not a terminal."""
from __future__ import annotations

import contextlib
import os
import sys

from tqdm import tqdm


@contextlib.contextmanager
def progress(total: int, desc: str, enabled: bool = True, unit: str = "img"):
    show = enabled and sys.stderr.isatty() and not os.environ.get("EDGEKIT_NO_PROGRESS")
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not show, leave=False,
               mininterval=0.5, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
