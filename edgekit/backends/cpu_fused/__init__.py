"""``cpu-fused``: GMBINet on edgekit's own fused CPU kernels (C++17, AVX2 / AVX-512, loaded with ctypes).

Build (``build.py``): the folded weights and one kernel library per ISA level, compiled with the system
C++ compiler at compile time. Run (``runner.py``): the fastest library this CPU supports. The kernels
follow the shared plan (``edgekit.kernels.graph.plan_gmbinet``); see ``kernels/README.md`` Part 3.
Precisions: fp32, int8 (the GMBI modules' 1x1 convs INT8, calibrated on ``--calib`` images, under the
pipeline's ``--max-drop`` budget like every INT8 target), and bf16 (the GMBI modules' 1x1 as bf16 products on AMX
tiles, fp32 accumulation; CPUs with AMX-BF16 only; held to the bf16 parity budget).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from edgekit.backends.registry import BackendSpec, register_backend


def _build(ctx) -> dict:
    from edgekit.backends.cpu_fused.build import build_cpu_fused

    return build_cpu_fused(ctx.source.checkpoint, ctx.folder, ctx.precision, calibration=ctx.calibration,
                           calibration_description=ctx.calibration_description, log=ctx.log)


def _load(path: Path, threads: Optional[int] = None, isa: Optional[str] = None, fuse_head: bool = True,
          batch_path: str = "stream"):
    from edgekit.backends.cpu_fused.runner import CpuFusedRunner

    return CpuFusedRunner(path, threads=threads, isa=isa, fuse_head=fuse_head, batch_path=batch_path)  # a VerifiedArtifact passes through


def _not_here() -> Optional[str]:
    import shutil

    from edgekit.kernels.cpu.runtime import supported_isas

    if not supported_isas():
        return "this CPU has neither AVX2+FMA nor AVX-512"
    cxx = os.environ.get("CXX", "g++")
    return None if shutil.which(cxx) else f"no C++ compiler ({cxx}) to build its kernels"


def _precision_not_here(precision: str) -> Optional[str]:
    from edgekit.backends.cpu_fused.build import BF16_ISA
    from edgekit.kernels.cpu.runtime import supported_isas

    if precision == "bf16" and BF16_ISA not in supported_isas():
        return "bf16 runs the GMBI 1x1 on AMX tiles: this CPU has no AMX-BF16"
    return None


def _outdated(manifest: dict) -> Optional[str]:
    from edgekit.kernels.cpu.runtime import source_path
    from edgekit.kernels.sources import source_digest

    if manifest.get("kernels", {}).get("source_sha256") != source_digest(source_path()):
        return "its kernel libraries were built from another version of gmbinet_cpu.cpp"
    return None


SPEC = register_backend(BackendSpec(
    name="cpu-fused", description="edgekit's fused CPU kernels (C++, AVX2 / AVX-512, fp32, INT8 1x1 or bf16 1x1 on AMX; needs g++ to compile)",
    precisions=("fp32", "int8", "bf16"), build=_build, int8="builder", needs={"int8": ("calibration",)}, load=_load, device="cpu", load_options=("threads", "isa", "fuse_head", "batch_path"),
    from_artifacts=(), bench_default=("fp32",), not_here=_not_here, outdated=_outdated,
    precision_not_here=_precision_not_here,
    # any width: the kernels' GEMMs take any channel count (masked vector tails). The GMBI stage widths are
    # multiples of 4 all the same, but that is the model's own rule (4 equal groups), which prune keeps per group.
    channel_multiple=1,
))
