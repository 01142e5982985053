"""The fused CUDA kernel for one GMBI module (``edgekit/kernels/cuda/gmbi_fused.cu``, design in
``kernels/README.md``): where its source lives, its host-emulation harness and the PyCUDA loader
(:class:`FusedGMBI`, one module on the GPU).

Only :class:`FusedGMBI` and :func:`load_kernel_module` need PyCUDA and a GPU.  Its launch planning
(:func:`edgekit.kernels.graph.plan_gmbi`) is device-neutral; its folding and float64 reference
(:mod:`edgekit.kernels.fold`) are build-side, with torch.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.kernels.cuda.module import NVCC_FLAGS, _require_pycuda, ensure_context, load_module  # noqa: F401
from edgekit.kernels.graph import (  # noqa: F401  (the kernel's launch constants, named where the kernel is)
    ARG_FORMAT, DEFAULT_SMEM_LIMIT_48K, HALO_R1, HALO_R2, HALO_R3, KERNEL_NAMES, MAX_GROUP_CHANNELS,
    PORTABLE_SMEM_LIMIT, THREADS, WARPS, GMBIPlan, plan_gmbi, smem_layout)

# ----------------------------------------------------------------------------------------------
# where the kernel lives

def kernel_dir() -> Path:
    """The folder holding ``gmbi_fused.cu`` (``$EDGEKIT_KERNEL_DIR``, else the package's own
    ``edgekit/kernels/cuda``: the sources are package data, so an installed wheel has them)."""
    env = os.environ.get("EDGEKIT_KERNEL_DIR")
    return Path(env) if env else Path(__file__).resolve().parent


def kernel_source_path() -> Path:
    path = kernel_dir() / "gmbi_fused.cu"
    if not path.is_file():
        raise EdgekitError(
            f"the fused GMBI kernel source is missing: {path} (set EDGEKIT_KERNEL_DIR to the folder "
            "holding gmbi_fused.cu)")
    return path


def kernel_build_dir() -> Path:
    """Where prebuilt cubins/fatbins are looked for (``$EDGEKIT_KERNEL_BUILD_DIR`` or ``<kernel_dir>/build``)."""
    env = os.environ.get("EDGEKIT_KERNEL_BUILD_DIR")
    return Path(env) if env else kernel_dir() / "build"


def source_sha256(path: Optional[Path] = None) -> str:
    return hashlib.sha256((path or kernel_source_path()).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# host emulation (CPU test harness for the kernel source, see edgekit/kernels/cuda/emu/)

_EMU_MAGIC = 0x474D4249


def run_emulated(exe: Union[str, Path], x: np.ndarray, params, plan: GMBIPlan,
                 timeout: float = 600) -> np.ndarray:
    """Run ``edgekit/kernels/cuda/gmbi_fused.cu`` compiled for host emulation (``edgekit.kernels.cuda.build.build_emulator``)
    on a float32 or float16 NCHW array; returns the kernel's output (NaN where it wrote nothing)."""
    x = np.ascontiguousarray(x)
    if x.dtype not in (np.float32, np.float16):
        raise EdgekitError(f"run_emulated: x must be float32 or float16, got {x.dtype}")
    n, c, h, w = x.shape
    if (n, c, h, w) != (plan.n, plan.channels, plan.height, plan.width):
        raise EdgekitError(f"run_emulated: x shape {x.shape} does not match the plan")
    arr = params.kernel_arrays()
    header = np.array([_EMU_MAGIC, 0 if x.dtype == np.float32 else 1, n, c, h, w, plan.tile_h, plan.tile_w,
                       plan.co_per_block, plan.co_splits, plan.buf_a, plan.buf_b, plan.smem_bytes, plan.block[0]],
                      dtype="<i4")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        with open(src, "wb") as f:
            for a in (header, x, arr["dw_w"], arr["dw_b"], arr["pw_wt"], arr["pw_b"]):
                f.write(a.tobytes())
        proc = subprocess.run([str(exe), str(src), str(dst)], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise EdgekitError(f"emulated GMBI kernel failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        return np.fromfile(dst, dtype=x.dtype).reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# PyCUDA loader and launcher


def load_kernel_module(arch: Optional[str] = None):
    """The kernel's ``pycuda.driver.Module`` for the current context: a prebuilt cubin/fatbin from
    :func:`kernel_build_dir` when its manifest matches the current source, otherwise compiled at load
    time with ``pycuda.compiler`` (nvcc on PATH; see ``edgekit.kernels.cuda.module.load_module``)."""
    _require_pycuda()
    return load_module(kernel_source_path(), kernel_build_dir(), arch)


def _kernel_function(dtype: str):
    fn = load_kernel_module().get_function(KERNEL_NAMES[dtype])
    fn.prepare(ARG_FORMAT)
    return fn


def _dtype_name(dtype) -> str:
    name = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(np.dtype(dtype)) \
        if not isinstance(dtype, str) else dtype
    if name not in KERNEL_NAMES:
        raise EdgekitError(f"fused GMBI: dtype must be float32 or float16, got {dtype}")
    return name


class FusedGMBI:
    """One GMBI module on the GPU: folded parameters uploaded once, one kernel launch per call.

    ``launch`` takes raw device pointers and a stream, so a whole-network runtime can chain
    modules on its own buffers and capture the sequence in a CUDA graph; ``__call__`` is the
    convenience form on ``pycuda.gpuarray`` arrays.  The output must not alias the input.
    """

    def __init__(self, module_or_params, dtype="float16"):
        """``module_or_params``: a ``GMBI`` module (folded here, with torch) or its ``GMBIParams``."""
        from edgekit.kernels.fold import GMBIParams, fold_gmbi

        drv, gpuarray = _require_pycuda()
        ensure_context()
        params = module_or_params if isinstance(module_or_params, GMBIParams) else fold_gmbi(module_or_params)
        if params.scales != 4:
            raise EdgekitError(f"fused GMBI: the kernel is written for 4 groups, the module has {params.scales}")
        plan_gmbi(1, params.channels, 1, 1)  # validates the channel count
        self.params = params
        self.channels = params.channels
        self.dtype = _dtype_name(dtype)
        self.np_dtype = np.float32 if self.dtype == "float32" else np.float16
        arrays = params.kernel_arrays()
        # gpuarray allocations are 256-byte aligned: the kernel's float4 loads need 16.
        self._dev = {k: gpuarray.to_gpu(v) for k, v in arrays.items()}
        self._fn = _kernel_function(self.dtype)
        dev = drv.Context.get_device()
        self.sm_count = dev.get_attribute(drv.device_attribute.MULTIPROCESSOR_COUNT)
        self.smem_limit = dev.get_attribute(drv.device_attribute.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        self._plans: Dict[Tuple[int, int, int], GMBIPlan] = {}
        self._smem_opted_in = 0

    def plan(self, n: int, height: int, width: int, tile: Optional[Tuple[int, int]] = None,
             co_splits: Optional[int] = None) -> GMBIPlan:
        if tile is None and co_splits is None:
            key = (n, height, width)
            if key not in self._plans:
                self._plans[key] = plan_gmbi(n, self.channels, height, width, sm_count=self.sm_count,
                                             smem_limit=self.smem_limit)
            return self._plans[key]
        return plan_gmbi(n, self.channels, height, width, sm_count=self.sm_count, smem_limit=self.smem_limit,
                         tile=tile, co_splits=co_splits)

    def param_pointers(self) -> Tuple[int, int, int, int]:
        d = self._dev
        return d["dw_w"].ptr, d["dw_b"].ptr, d["pw_wt"].ptr, d["pw_b"].ptr

    def launch(self, x_ptr: int, out_ptr: int, n: int, height: int, width: int, stream=None,
               plan: Optional[GMBIPlan] = None) -> None:
        """Enqueue the kernel on ``stream`` (a ``pycuda.driver.Stream`` or None for the default
        stream).  ``x_ptr`` / ``out_ptr``: device pointers to contiguous NCHW tensors of this
        module's dtype; they must not overlap.  Asynchronous; nothing is allocated."""
        drv, _ = _require_pycuda()
        if int(x_ptr) == int(out_ptr):
            raise EdgekitError("fused GMBI: the output must not alias the input")
        plan = plan or self.plan(n, height, width)
        if (plan.n, plan.channels, plan.height, plan.width) != (n, self.channels, height, width):
            raise EdgekitError("fused GMBI: the plan was made for another shape")
        if plan.smem_bytes > DEFAULT_SMEM_LIMIT_48K and self._smem_opted_in < plan.smem_bytes:
            self._fn.set_attribute(drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, plan.smem_bytes)
            self._smem_opted_in = plan.smem_bytes
        self._fn.prepared_async_call(plan.grid, plan.block, stream, int(x_ptr), int(out_ptr),
                                     *self.param_pointers(), *plan.scalar_args(), shared_size=plan.smem_bytes)

    def __call__(self, x, out=None, stream=None, plan: Optional[GMBIPlan] = None):
        _, gpuarray = _require_pycuda()
        if len(x.shape) != 4 or x.shape[1] != self.channels:
            raise EdgekitError(f"fused GMBI: expected [N, {self.channels}, H, W], got {tuple(x.shape)}")
        if x.dtype != self.np_dtype or not x.flags.c_contiguous:
            raise EdgekitError(f"fused GMBI: input must be a C-contiguous {self.dtype} array")
        if out is None:
            out = gpuarray.empty(x.shape, dtype=self.np_dtype)
        elif out.shape != x.shape or out.dtype != self.np_dtype or not out.flags.c_contiguous:
            raise EdgekitError("fused GMBI: out must be a C-contiguous array with the input's shape and dtype")
        if out.ptr < x.ptr + x.nbytes and x.ptr < out.ptr + out.nbytes:
            raise EdgekitError("fused GMBI: the output must not overlap the input")
        n, _, h, w = x.shape
        self.launch(x.ptr, out.ptr, n, h, w, stream=stream, plan=plan)
        return out
