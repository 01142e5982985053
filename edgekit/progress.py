"""Progress on stderr: a bar (tqdm: stage name, count, elapsed<ETA) for every counted loop, and a
stage line before and after a step that takes seconds but counts nothing (an opaque library call
such as ``nncf.quantize`` or an ONNX export).

When it shows (:func:`progress_enabled`): stderr is a terminal, or ``EDGEKIT_PROGRESS=1`` forces it
on (a log file, a test); never with ``EDGEKIT_NO_PROGRESS=1`` (it wins over both), nor where the caller
passes ``enabled=False`` (a nested evaluation inside a step that has its own bar). stdout is never
touched: it carries the command's result only.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Iterable, Iterator, Optional, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def progress_enabled(enabled: bool = True) -> bool:
    """Whether progress goes to stderr now (see the module docstring)."""
    if not enabled or _flag("EDGEKIT_NO_PROGRESS"):
        return False
    return _flag("EDGEKIT_PROGRESS") or sys.stderr.isatty()


def _mininterval() -> float:
    # A terminal redraws its one line in place; a log file (forced on) gets a line per update, so fewer.
    return 0.5 if sys.stderr.isatty() else 5.0


@contextlib.contextmanager
def progress(total: Optional[int], desc: str, enabled: bool = True, unit: str = "img"):
    """A bar of ``total`` steps (None: a count without ETA) named ``desc``; update it with ``bar.update(n)``."""
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress_enabled(enabled),
               leave=False, mininterval=_mininterval(), dynamic_ncols=True)
    heartbeat = Heartbeat(bar) if not bar.disable and sys.stderr.isatty() else None
    try:
        yield bar
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        bar.close()


class Heartbeat:
    """Redraws a terminal bar every second so its elapsed time keeps moving while one step takes long
    (a Taylor backward pass over 8 images at 512x512 took 136 s on a loaded 2-core machine: a bar
    updated per step alone sat still that long). tqdm's own lock guards the redraw."""

    def __init__(self, bar, every_s: float = 1.0):
        self.bar, self.every_s = bar, every_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="edgekit-progress", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.every_s):
            try:
                self.bar.refresh()
            except Exception:  # a bar closed under us, a terminal gone: stop redrawing, never fail the work
                return

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=2 * self.every_s)


def track(items: Iterable[T], total: Optional[int], desc: str, enabled: bool = True, unit: str = "img",
          count=None) -> Iterator[T]:
    """``items`` (possibly lazy: a generator of batches) with a bar; ``count(item)`` is how many
    ``unit`` one item is (a batch of 8 images: 8), 1 by default."""
    with progress(total, desc, enabled=enabled, unit=unit) as bar:
        for item in items:
            yield item
            bar.update(count(item) if count is not None else 1)


def write_stderr(message: str) -> None:
    """A line on stderr that does not tear a bar being drawn: notes and logs, shown whatever the progress
    setting says."""
    tqdm.write(message, file=sys.stderr)


def say(message: str, enabled: bool = True) -> None:
    """One progress line on stderr (shown under the rules above), above any bar being drawn."""
    if progress_enabled(enabled):
        write_stderr(message)


@contextlib.contextmanager
def stage(name: str, enabled: bool = True):
    """``name ...`` before a step that counts nothing, ``name: done in 12.3 s`` after it (nothing after
    a failure: the error line says what happened)."""
    say(f"{name} ...", enabled)
    t0 = time.monotonic()
    yield
    say(f"{name}: done in {time.monotonic() - t0:.1f} s", enabled)
