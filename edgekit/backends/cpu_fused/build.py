"""Build a ``cpu-fused`` artifact: the folded weights and the kernel library, compiled here, per ISA level.

Folder::

    weights.bin                    every folded parameter, fp32, one blob (fold_gmbinet().param_layout())
    kernels/libgmbinet_avx2.so     gmbinet_cpu.cpp built with -mavx2 -mfma (the baseline)
    kernels/libgmbinet_avx512.so   the same source with -mavx512f/vl/bw/dq
    manifest.json                  + the parameter layout, the ISA levels, compiler and flags per library

The manifest's file hashes cover the weights and every library, so a corrupt or replaced file is refused
before anything is loaded.  The compiler is needed here only: a deployed device loads the library.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from edgekit.errors import EdgekitError

WEIGHTS_FILE = "weights.bin"
PRECISIONS = ("fp32",)


def library_name(isa: str) -> str:
    return f"kernels/libgmbinet_{isa}.so"


def build_cpu_fused(checkpoint, folder: Path, precision: str = "fp32", *, isas: Optional[Sequence[str]] = None,
                    log: Callable = print) -> dict:
    """Write the weights and the libraries into ``folder``; returns the manifest fields."""
    from edgekit.kernels.cpu_fused import ISA_LEVELS, build_library, find_compiler, source_path
    from edgekit.kernels.gmbinet import fold_gmbinet, source_digest

    if checkpoint is None:
        raise EdgekitError("--target cpu-fused compiles from a GMBINet checkpoint, not from an artifact folder")
    if checkpoint.model_name != "gmbinet":
        raise EdgekitError(f"--target cpu-fused runs GMBINet only, not {checkpoint.model_name!r}")
    if precision not in PRECISIONS:
        raise EdgekitError(f"target cpu-fused does not offer precision {precision} (choose from {', '.join(PRECISIONS)})")
    isas = list(isas) if isas else list(ISA_LEVELS)
    unknown = [i for i in isas if i not in ISA_LEVELS]
    if unknown:
        raise EdgekitError(f"cpu-fused: unknown ISA level {unknown[0]!r} (choose from {', '.join(ISA_LEVELS)})")
    cxx = find_compiler()  # one line, before anything is written, when there is no compiler
    net = fold_gmbinet(checkpoint.build().eval())  # refuses (one line) what the kernels cannot run
    blob, offsets = net.param_layout()
    folder = Path(folder)
    blob.tofile(folder / WEIGHTS_FILE)
    (folder / "kernels").mkdir(exist_ok=True)
    with ThreadPoolExecutor(max_workers=len(isas)) as pool:  # one compiler process per ISA level, in parallel
        built = list(pool.map(lambda isa: build_library(isa, folder / library_name(isa), cxx), isas))
    libs = {}
    for isa, info in zip(isas, built):
        libs[isa] = {"file": library_name(isa), "compiler": info["compiler"], "flags": info["flags"]}
        log(f"cpu-fused: {isa} kernels built with {info['compiler']}")
    return {
        "model_file": WEIGHTS_FILE,
        "extra_files": [libs[i]["file"] for i in isas],
        "runtime": "cpu-fused (ctypes)",
        "isa": isas,
        "kernels": {"source": source_path().name, "source_sha256": source_digest(source_path()), "libraries": libs},
        "net": {"in_channels": net.in_channels, "widths": list(net.widths), "depths": list(net.depths),
                "out_channels": net.out_channels, "head_width": net.head_width},
        "param_layout": {name: [int(off), int(nb)] for name, (off, nb) in offsets.items()},
        "weights_bytes": int(blob.nbytes),
    }


def read_weights(folder: Path, manifest: dict) -> np.ndarray:
    path = Path(folder) / manifest["model_file"]
    blob = np.fromfile(path, dtype=np.uint8)
    if blob.nbytes != int(manifest.get("weights_bytes", -1)):
        raise EdgekitError(f"{folder}: {manifest['model_file']} has {blob.nbytes} bytes, the manifest says "
                           f"{manifest.get('weights_bytes')}")
    return blob
