"""The one way journeys run edgekit: the CLI a user runs, as a separate process, in the journey's folder.

Every journey (tests/journeys/test_*.py) imports ``edgekit`` from here, so they all run the CLI the same way:
``python -m edgekit.cli`` of this checkout, progress off (EDGEKIT_NO_PROGRESS=1: a journey never reads
progress text), a cache inside the journey's folder, 2 threads, and a refusal checked to be one ``error:`` line.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def edgekit_env(cwd: Path, **extra) -> dict:
    """The environment a journey's commands run in (also for processes a journey starts itself)."""
    return dict(os.environ, PYTHONPATH=str(ROOT), EDGEKIT_NO_PROGRESS="1", EDGEKIT_CACHE=str(cwd / ".cache"),
                OMP_NUM_THREADS="2", **extra)


def edgekit(cwd: Path, *args, expect: int = 0, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """``edgekit ARGS`` as a separate process (the CLI a user runs), in ``cwd``; its exit status must be ``expect``,
    and a refusal (``expect`` != 0) is exactly one ``error: ...`` line on stderr."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "edgekit.cli", *map(str, args)], cwd=cwd,
                       env=env if env is not None else edgekit_env(cwd), capture_output=True, text=True,
                       timeout=timeout)
    if os.environ.get("EDGEKIT_JOURNEY_TIMES"):  # where a journey's minutes go: one line per command
        with open(os.environ["EDGEKIT_JOURNEY_TIMES"], "a") as f:
            f.write(f"{time.monotonic() - t0:7.2f} s  edgekit {' '.join(map(str, args))[:160]}\n")
    assert r.returncode == expect, f"edgekit {' '.join(map(str, args))} -> {r.returncode}\n{r.stderr[-3000:]}"
    if expect != 0:
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return r


def cpu_targets() -> list:
    """Every CPU target this machine can compile: onnx and openvino, and cpu-fused where g++ exists."""
    targets = ["onnx", "openvino"]
    if shutil.which(os.environ.get("CXX", "g++")):
        targets.append("cpu-fused")
    return targets
