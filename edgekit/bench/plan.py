"""Which rows a benchmark runs: artifacts as given, checkpoints expanded into backend x precision
rows compiled once into a cache folder (keyed by the checkpoint's sha256)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from edgekit.errors import EdgekitError
from edgekit.export.artifact import is_artifact, read_manifest
from edgekit.utils import sha256_file

# The rows of `edgekit bench CKPT` (the one place that chooses them; issue 11 moves the choice to
# BackendSpec.bench_default). By default: the source model, the plain baseline every ratio is taken
# against, and INT8, the one precision that changes the arithmetic on every x86 CPU (bf16 only runs
# where the CPU has it, and fp32 is what the baseline already runs on CPUs without bf16). Two
# artifacts to build keep the first run of the Quickstart short; `--all` gives every CPU row.
DEFAULT_CPU_BACKENDS = ("torch", "openvino:default", "openvino:int8")
ALL_CPU_BACKENDS = ("torch", "onnx", "ort", "openvino:default", "openvino:fp32", "openvino:bf16", "openvino:int8")
BASELINE = "openvino:default"


def default_cpu_backends(all_rows: bool = False) -> tuple:
    """The target[:precision] rows a checkpoint expands into when --backends is not given."""
    return ALL_CPU_BACKENDS if all_rows else DEFAULT_CPU_BACKENDS


def cache_root() -> Path:
    return Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit"))


def parse_backend(spec: str):
    target, _, precision = spec.partition(":")
    return target, precision or ("fp32" if target != "torch" else "fp32")


def artifact_for(ckpt: Path, spec: str, calib: Optional[str], parity_data: str, threads, log) -> Path:
    """Compile (or reuse) the artifact of ``ckpt`` for ``spec`` = target[:precision]."""
    from edgekit.export.compile import compile_model

    target, precision = parse_backend(spec)
    folder = cache_root() / "bench" / sha256_file(ckpt)[:16] / f"{target}_{precision}"
    if is_artifact(folder):
        try:
            read_manifest(folder)
            log(f"  cached: {folder}")
            return folder
        except EdgekitError:
            pass  # stale or corrupt cache entry: rebuild it
    log(f"  compiling into {folder} (cached for the next run)")
    compile_model(str(ckpt), target, precision, str(folder), calib=calib, parity_data=parity_data,
                       force=True, threads=threads, log=log)
    return folder


def plan_rows(models: List[str], backends: List[str], calib: Optional[str], parity_data: str, threads, log):
    """[(row name, path)] for the benchmark; says on ``log`` which artifact it compiles or reuses."""
    for m in models:
        if not Path(m).exists():
            raise EdgekitError(f"model not found: {m}")
    rows, builds = [], [(Path(m), s) for m in models if not is_artifact(Path(m)) for s in backends if s != "torch"]
    built = 0
    for m in models:
        p = Path(m)
        if is_artifact(p):
            man = read_manifest(p)
            rows.append((f"{man['target']}:{man['precision']} ({p.name})", p))
            continue
        for spec in backends:
            if spec == "torch":
                rows.append(("torch", p))
            else:
                built += 1
                log(f"artifact {built}/{len(builds)}: {spec} of {p.name}")
                rows.append((spec, artifact_for(p, spec, calib, parity_data, threads, log)))
    return rows
