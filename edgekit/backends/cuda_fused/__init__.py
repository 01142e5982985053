"""``cuda-fused``: edgekit's own fused CUDA kernels for GMBINet, run through PyCUDA (GPU).

Build (``build.py``): the checkpoint plus kernels prebuilt with nvcc when it is there; verified on a
GPU, or by host emulation of the same launch plan where there is none. Run: ``runner.py``. It builds
from checkpoints only, and loads checkpoints directly too (``runtime.load(ckpt, backend="cuda-fused")``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from edgekit.backends.registry import BackendSpec, register_backend


def _build(ctx) -> dict:
    from edgekit.backends.cuda_fused.build import build

    return build(ctx)


def _load(path: Path, precision: Optional[str] = None, use_graph: bool = True):
    from edgekit.backends.cuda_fused.runner import load_cuda_fused

    return load_cuda_fused(path, precision=precision, use_graph=use_graph)


def _verify(folder: Path, precision: str, log):
    from edgekit.backends.cuda_fused.build import verification_runner

    return verification_runner(folder, precision, log)


SPEC = register_backend(BackendSpec(
    name="cuda-fused", description="edgekit's fused CUDA kernels (GPU, PyCUDA)", precisions=("fp16", "fp32"),
    build=_build, load=_load, package="pycuda", pip_name="pycuda", extra="gpu", device="gpu",
    load_options=("precision", "use_graph"), tools=("pycuda",), from_artifacts=(), verifier=_verify,
    bench_default=("fp32", "fp16"), gpu_bench_default=("fp32", "fp16"), runs_checkpoints=True,
    builds_without_package=True,  # nvcc prebuilds the kernels and host emulation verifies them: no PyCUDA needed
    channel_multiple=4,  # fold_gmbinet / plan_dwpw / plan_gmbi: widths divisible by 4 (float4 weight loads over Cout)
))
