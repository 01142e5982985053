"""Which rows a benchmark runs: artifacts as given, checkpoints expanded into backend x precision
rows compiled once into a cache folder (keyed by the checkpoint's sha256)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from edgekit.backends.registry import get_backend
from edgekit.errors import EdgekitError
from edgekit.artifact import is_artifact, read_manifest
from edgekit.utils import sha256_file

BASELINE = "openvino:default"


def default_cpu_backends() -> list:
    """The rows of ``edgekit bench`` without ``--backends``: each backend's ``bench_default``."""
    from edgekit.backends.registry import default_bench_rows

    return default_bench_rows("cpu")


def cache_root() -> Path:
    return Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit"))


def parse_backend(spec: str):
    target, _, precision = spec.partition(":")
    return target, precision or "fp32"


def artifact_for(ckpt: Path, spec: str, calib: Optional[str], parity_data: str, threads, log) -> Path:
    """Compile (or reuse) the artifact of ``ckpt`` for ``spec`` = target[:precision]."""
    from edgekit.pipeline.compile import compile_model

    target, precision = parse_backend(spec)
    folder = cache_root() / "bench" / sha256_file(ckpt)[:16] / f"{target}_{precision}"
    if is_artifact(folder):
        try:
            read_manifest(folder)
            return folder
        except EdgekitError:
            pass  # stale or corrupt cache entry: rebuild it
    compile_model(str(ckpt), target, precision, str(folder), calib=calib, parity_data=parity_data,
                       force=True, threads=threads, log=log)
    return folder


def plan_rows(models: List[str], backends: List[str], calib: Optional[str], parity_data: str, threads, log):
    """[(row name, path)] for the benchmark."""
    rows = []
    for m in models:
        p = Path(m)
        if not p.exists():
            raise EdgekitError(f"model not found: {p}")
        if is_artifact(p):
            man = read_manifest(p)
            rows.append((f"{man['target']}:{man['precision']} ({p.name})", p))
            continue
        for spec in backends:
            if get_backend(parse_backend(spec)[0]).build is None:  # runs the checkpoint itself (torch)
                rows.append((parse_backend(spec)[0], p))
            else:
                rows.append((spec, artifact_for(p, spec, calib, parity_data, threads, log)))
    return rows
