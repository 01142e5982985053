"""Fused CUDA kernel for one GMBI module: BN folding, an fp64 reference, launch planning and a
PyCUDA loader.

Everything except :class:`FusedGMBI` (and :func:`load_kernel_module`) works without a GPU and
without PyCUDA: :func:`fold_gmbi` turns a ``GMBI`` module into plain folded arrays,
:func:`reference_gmbi` is the float64 PyTorch definition the kernel is tested against, and
:func:`plan_gmbi` computes the launch configuration.  The kernel source is
``edgekit/kernels/cuda/gmbi_fused.cu`` (see ``kernels/README.md`` for the design).
"""
from __future__ import annotations

import hashlib
import math
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekit.errors import EdgekitError
from edgekit.kernels.cuda_module import NVCC_FLAGS, _require_pycuda, ensure_context, load_module  # noqa: F401

# ----------------------------------------------------------------------------------------------
# where the kernel lives, how it is compiled

THREADS = 256  # GMBI_THREADS in the kernel
WARPS = THREADS // 32
HALO_R1, HALO_R2, HALO_R3 = 9, 7, 4  # GMBI_HALO_* in the kernel
MAX_GROUP_CHANNELS = 32
# The largest dynamic shared memory a block can opt in to: sm_89 99 KB, sm_87 163 KB, sm_90 227 KB.
PORTABLE_SMEM_LIMIT = 99 * 1024
DEFAULT_SMEM_LIMIT_48K = 48 * 1024  # above this a kernel must opt in (cuFuncSetAttribute)
KERNEL_NAMES = {"float32": "gmbi_fused_f32", "float16": "gmbi_fused_f16"}
# PyCUDA argument format: x, out, dw_w, dw_b, pw_wt, pw_b, then C H W tile_h tile_w co_per_block
# co_splits buf_a buf_b.
ARG_FORMAT = "PPPPPPiiiiiiiii"


def kernel_dir() -> Path:
    """The folder holding ``gmbi_fused.cu`` (``$EDGEKIT_KERNEL_DIR``, else the package's own
    ``edgekit/kernels/cuda``: the sources are package data, so an installed wheel has them)."""
    env = os.environ.get("EDGEKIT_KERNEL_DIR")
    return Path(env) if env else Path(__file__).resolve().parent / "cuda"


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
# BN folding and the float64 reference


@dataclass
class GMBIParams:
    """A GMBI module with BatchNorm folded in (float64, CPU).

    ``dw_weight[k]`` is the 3x3 kernel (row-major, 9 taps) of channel ``k`` of the concatenated
    groups (group ``i`` owns channels ``i*G .. i*G+G-1`` and uses dilation ``i+1``);
    ``pw_weight`` is the 1x1 fusion conv as ``[C_out, C_in]``.
    """

    channels: int
    scales: int
    dw_weight: torch.Tensor  # [C, 9]
    dw_bias: torch.Tensor  # [C]
    pw_weight: torch.Tensor  # [C_out, C_in]
    pw_bias: torch.Tensor  # [C]

    @property
    def group_channels(self) -> int:
        return self.channels // self.scales

    def kernel_arrays(self) -> Dict[str, np.ndarray]:
        """fp32, C-contiguous arrays in the order and layout the kernel takes them."""
        f32 = lambda t: np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))  # noqa: E731
        return {
            "dw_w": f32(self.dw_weight.reshape(self.channels, 9)),
            "dw_b": f32(self.dw_bias),
            "pw_wt": f32(self.pw_weight.t()),  # [C_in][C_out]: a float4 is 4 consecutive outputs
            "pw_b": f32(self.pw_bias),
        }


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding conv, in float64: returns (weight, bias)."""
    if bn.running_mean is None or bn.running_var is None:
        raise EdgekitError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    w = conv.weight.detach().to(torch.float64)
    b = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    mean = bn.running_mean.detach().to(torch.float64)
    var = bn.running_var.detach().to(torch.float64)
    gamma = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return w * scale.view(-1, *([1] * (w.dim() - 1))), (b - mean) * scale + beta


def _conv_bn_relu_parts(seq: nn.Module, where: str) -> Tuple[nn.Conv2d, nn.BatchNorm2d]:
    parts = list(seq.children()) if isinstance(seq, nn.Sequential) else []
    if (len(parts) != 3 or not isinstance(parts[0], nn.Conv2d) or not isinstance(parts[1], nn.BatchNorm2d)
            or not isinstance(parts[2], nn.ReLU)):
        raise EdgekitError(f"GMBI fold: {where} is not Conv2d + BatchNorm2d + ReLU")
    return parts[0], parts[1]


def fold_gmbi(module: nn.Module) -> GMBIParams:
    """Fold the BatchNorms of a ``edgekit.models.gmbinet.GMBI`` module (eval semantics: running
    statistics) into its convs.  Works on CPU; the result is float64."""
    convs = getattr(module, "group_convs", None)
    fusion = getattr(module, "fusion", None)
    if convs is None or fusion is None:
        raise EdgekitError(f"fold_gmbi expects a GMBI module, got {type(module).__name__}")
    scales = len(convs)
    dw_w, dw_b = [], []
    g = None
    for i, seq in enumerate(convs):
        conv, bn = _conv_bn_relu_parts(seq, f"conv{i}")
        gi = conv.out_channels
        if g is None:
            g = gi
        if (gi != g or conv.in_channels != gi or conv.groups != gi or tuple(conv.kernel_size) != (3, 3)
                or tuple(conv.dilation) != (i + 1, i + 1) or tuple(conv.padding) != (i + 1, i + 1)
                or tuple(conv.stride) != (1, 1)):
            raise EdgekitError(
                f"GMBI fold: conv{i} must be a depthwise 3x3 conv with dilation {i + 1}, padding {i + 1} and "
                f"{g} channels like conv0")
        w, b = fold_conv_bn(conv, bn)
        dw_w.append(w.reshape(gi, 9))
        dw_b.append(b)
    conv, bn = _conv_bn_relu_parts(fusion, "fusion")
    c = g * scales
    if tuple(conv.kernel_size) != (1, 1) or conv.in_channels != c or conv.out_channels != c or conv.groups != 1:
        raise EdgekitError(f"GMBI fold: fusion must be a dense 1x1 conv {c} -> {c}")
    pw_w, pw_b = fold_conv_bn(conv, bn)
    return GMBIParams(channels=c, scales=scales, dw_weight=torch.cat(dw_w), dw_bias=torch.cat(dw_b),
                      pw_weight=pw_w.reshape(c, c), pw_bias=pw_b)


def reference_gmbi(x: torch.Tensor, params: GMBIParams) -> torch.Tensor:
    """The GMBI forward pass from folded parameters, in float64 (CPU or GPU, NCHW).

    This is the definition the fused kernel is checked against."""
    if x.dim() != 4 or x.shape[1] != params.channels:
        raise EdgekitError(f"reference_gmbi: expected [N, {params.channels}, H, W], got {tuple(x.shape)}")
    x = x.to(torch.float64)
    dev = x.device
    g, n = params.group_channels, params.scales
    dw_w = params.dw_weight.to(dev, torch.float64).reshape(-1, 1, 3, 3)
    dw_b = params.dw_bias.to(dev, torch.float64)
    xs = torch.split(x, g, dim=1)
    ys = []
    for i in range(n):
        xi = xs[i]
        if i > 0:
            xi = torch.sigmoid(ys[-1]) * xi + xi
        sl = slice(i * g, (i + 1) * g)
        ys.append(F.relu(F.conv2d(xi, dw_w[sl], dw_b[sl], padding=i + 1, dilation=i + 1, groups=g)))
    zs = [torch.sigmoid(ys[i + 1]) * ys[i] + ys[i] for i in range(n - 1)] + [ys[-1]]
    pw_w = params.pw_weight.to(dev, torch.float64)
    fused = F.conv2d(torch.cat(zs, dim=1), pw_w.reshape(*pw_w.shape, 1, 1), params.pw_bias.to(dev, torch.float64))
    return F.relu(fused) + x


# ----------------------------------------------------------------------------------------------
# launch planning (pure Python)


@dataclass(frozen=True)
class GMBIPlan:
    """Launch configuration of the fused kernel for one input shape."""

    n: int
    channels: int
    height: int
    width: int
    tile_h: int
    tile_w: int
    co_per_block: int
    co_splits: int
    buf_a: int  # floats per warp, halo-7 region
    buf_b: int  # floats per warp, halo-9 region (reused for the halo-4 region)
    smem_bytes: int
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int] = (THREADS, 1, 1)

    @property
    def blocks(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def scalar_args(self) -> Tuple[int, ...]:
        return (self.channels, self.height, self.width, self.tile_h, self.tile_w, self.co_per_block,
                self.co_splits, self.buf_a, self.buf_b)


def smem_layout(channels: int, tile_h: int, tile_w: int, height: int, width: int) -> Tuple[int, int, int]:
    """(buf_a, buf_b, smem_bytes) for a tile; see the shared-memory comment in gmbi_fused.cu."""
    buf_b = min(tile_h + 2 * HALO_R1, height) * min(tile_w + 2 * HALO_R1, width)
    buf_a = min(tile_h + 2 * HALO_R2, height) * min(tile_w + 2 * HALO_R2, width)
    lane_warps = min(channels // 4, WARPS)
    return buf_a, buf_b, 4 * (channels * tile_h * tile_w + lane_warps * (buf_a + buf_b))


TILE_CANDIDATES = ((16, 16), (8, 16), (8, 8))


def plan_gmbi(n: int, channels: int, height: int, width: int, *, sm_count: int = 132,
              smem_limit: int = PORTABLE_SMEM_LIMIT, tile: Optional[Tuple[int, int]] = None,
              co_splits: Optional[int] = None) -> GMBIPlan:
    """Choose tile size and output-channel split for an input of ``[n, channels, height, width]``.

    Heuristic (to be replaced by measurements on the target GPU): among the tiles of
    ``TILE_CANDIDATES`` whose shared memory leaves room for two blocks per SM (if any), the largest
    that still gives at least ``sm_count`` blocks (else the smallest), then split
    the output channels over 2, 4, ... blocks (each recomputing z for its tile, which is cheap next
    to the 1x1 conv) until there are ``sm_count`` blocks or a block would get fewer than 8 outputs.
    ``tile`` / ``co_splits`` override the heuristic.
    """
    if min(n, height, width) < 1:
        raise EdgekitError(f"fused GMBI: empty input [{n}, {channels}, {height}, {width}]")
    if channels % 4 or not 1 <= channels // 4 <= MAX_GROUP_CHANNELS:
        raise EdgekitError(f"fused GMBI: channels must be 4 * G with 1 <= G <= {MAX_GROUP_CHANNELS}, got {channels}")
    candidates = [tuple(tile)] if tile is not None else list(TILE_CANDIDATES)
    chosen = None
    # First pass: only tiles that leave room for two resident blocks per SM; second: any that fits.
    for limit in ((smem_limit,) if tile is not None else (smem_limit // 2, smem_limit)):
        for th, tw in candidates:
            if th < 1 or tw < 1:
                raise EdgekitError(f"fused GMBI: bad tile {th}x{tw}")
            th, tw = min(th, height), min(tw, width)
            _, _, smem = smem_layout(channels, th, tw, height, width)
            if smem > limit:
                if tile is not None:
                    raise EdgekitError(
                        f"fused GMBI: tile {th}x{tw} with {channels} channels needs {smem} bytes of shared memory, "
                        f"more than the {smem_limit} available")
                continue
            blocks = n * math.ceil(height / th) * math.ceil(width / tw)
            chosen = (th, tw, blocks)
            if blocks >= sm_count:
                break
        if chosen is not None:
            break
    if chosen is None:
        raise EdgekitError(f"fused GMBI: no tile fits in {smem_limit} bytes of shared memory with {channels} channels")
    th, tw, blocks = chosen
    if co_splits is None:
        s = 1
        while blocks * s < sm_count and channels // (2 * s) >= 8 and (channels // (2 * s)) % 4 == 0:
            s *= 2
    else:
        s = int(co_splits)
        if s < 1:
            raise EdgekitError(f"fused GMBI: co_splits must be >= 1, got {co_splits}")
    co_per_block = 4 * math.ceil(math.ceil(channels / s) / 4)
    s = math.ceil(channels / co_per_block)
    buf_a, buf_b, smem = smem_layout(channels, th, tw, height, width)
    grid = (math.ceil(width / tw), math.ceil(height / th), n * s)
    if grid[1] > 65535 or grid[2] > 65535:
        raise EdgekitError(f"fused GMBI: grid {grid} exceeds the CUDA limits; use a smaller batch")
    return GMBIPlan(n=n, channels=channels, height=height, width=width, tile_h=th, tile_w=tw,
                    co_per_block=co_per_block, co_splits=s, buf_a=buf_a, buf_b=buf_b, smem_bytes=smem, grid=grid)


# ----------------------------------------------------------------------------------------------
# host emulation (CPU test harness for the kernel source, see edgekit/kernels/cuda/emu/)

_EMU_MAGIC = 0x474D4249


def run_emulated(exe: Union[str, Path], x: np.ndarray, params: GMBIParams, plan: GMBIPlan,
                 timeout: float = 600) -> np.ndarray:
    """Run ``edgekit/kernels/cuda/gmbi_fused.cu`` compiled for host emulation (``edgekit.kernels.build.build_emulator``)
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
    time with ``pycuda.compiler`` (nvcc on PATH; see ``edgekit.kernels.cuda_module.load_module``)."""
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

    def __init__(self, module_or_params: Union[nn.Module, GMBIParams], dtype="float16"):
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
