"""Building the fused CPU kernels (build side: a C++17 compiler; the INT8 calibration runs in PyTorch):
one library per ISA level from ``gmbinet_cpu.cpp``, and the INT8 1x1 weights of the GMBI modules.

A device never imports this module: it loads the built library with :mod:`edgekit.kernels.cpu.runtime`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.kernels.cpu.runtime import ISA_LEVELS, source_path
from edgekit.kernels.graph import FoldedGMBINet

CXX_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno")  # never -ffast-math: see vsigmoid_pos()


def find_compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise EdgekitError(f"--target cpu-fused builds its kernels with a C++17 compiler at compile time: {cxx!r} "
                           "not found (install g++ or set CXX); the built artifact then runs without one")
    return path


def compiler_version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0].strip() if out.stdout else cxx


def build_library(isa: str, out: Path, cxx: Optional[str] = None, source: Optional[Path] = None) -> dict:
    """Compile the kernel source (``source``: another copy of it) for one ISA level into ``out`` (a shared library)."""
    if isa not in ISA_LEVELS:
        raise EdgekitError(f"cpu-fused: unknown ISA level {isa!r} (choose from {', '.join(ISA_LEVELS)})")
    cxx = cxx or find_compiler()
    flags = [*CXX_FLAGS, *ISA_LEVELS[isa][0]]
    cmd = [cxx, *flags, "-o", str(out), str(source or source_path()), "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EdgekitError(f"cpu-fused: {Path(cxx).name} failed to build the {isa} kernels:\n{proc.stderr[-3000:]}")
    return {"isa": isa, "compiler": compiler_version(cxx), "flags": flags}


# ----------------------------------------------------------------------------------------------
# INT8 1x1 of the GMBI modules

Q_LEVELS = 127  # 7-bit unsigned activations: vpmaddubsw's s16 pair sums (2 x 127 x 127) never saturate


def gmbi_1x1_ranges(model, batches: Sequence[np.ndarray]) -> Dict[str, float]:
    """{gmbi layer name: max of its 1x1's input z} over the calibration batches (real images, preprocessed),
    read with forward pre-hooks on each module's ``fusion`` in PyTorch (the reference the kernels match)."""
    import torch

    ranges: Dict[str, float] = {}
    hooks = []
    for s in range(2, 6):
        for i, blk in enumerate(list(getattr(model, f"encoder{s}").children())[1:], start=1):
            name = f"gmbi{s}_{i}"

            def grab(_mod, inputs, name=name):
                ranges[name] = max(ranges.get(name, 0.0), float(inputs[0].detach().amax()))
            hooks.append(blk.fusion.register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            for b in batches:
                model(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)))
    finally:
        for h in hooks:
            h.remove()
    return ranges


def quantize_gmbi_1x1(net: FoldedGMBINet, ranges: Dict[str, float]) -> Dict[str, dict]:
    """Add the INT8 1x1 arrays to every GMBI layer of ``net`` (in place): ``pw_q`` the s8 weights, symmetric
    per output channel, packed as [G][C] words whose 4 bytes are the input channels c, G+c, 2G+c, 3G+c (the
    order in which the chain's stage-4 pass packs z); ``pw_qscale`` s_z * s_w[co]; ``pw_qinv`` 1 / s_z.
    Returns the per-layer record for the manifest."""
    report = {}
    for name, layer in net.layers.items():
        if layer.kind != "gmbi":
            continue
        if name not in ranges:
            raise EdgekitError(f"cpu-fused int8: no calibration range for {name}")
        wt = np.asarray(layer.arrays["pw_wt"], dtype=np.float64)  # [cin][cout]
        cin, cout = wt.shape
        g = cin // 4
        s_w = np.abs(wt).max(axis=0) / Q_LEVELS
        s_w[s_w == 0] = 1.0
        q = np.clip(np.rint(wt / s_w), -Q_LEVELS, Q_LEVELS).astype(np.int8)  # [cin][cout]
        packed = np.stack([q[i * g:(i + 1) * g, :] for i in range(4)], axis=-1)  # [G][cout][4]
        s_z = max(float(ranges[name]), 1e-12) / Q_LEVELS
        layer.arrays["pw_q"] = np.ascontiguousarray(packed).view(np.uint32).reshape(g, cout)
        layer.arrays["pw_qscale"] = (s_z * s_w).astype(np.float32)
        layer.arrays["pw_qinv"] = np.array([1.0 / s_z], dtype=np.float32)
        w_err = float(np.abs(q * s_w - wt).max())
        report[name] = {"z_max": float(ranges[name]), "weight_max_abs_err": w_err}
    return report


__all__ = ["CXX_FLAGS", "build_library", "compiler_version", "find_compiler", "gmbi_1x1_ranges", "quantize_gmbi_1x1"]
