"""The whole GMBINet on the CUDA kernels (``gmbinet_layers.cu``, which #includes ``gmbi_fused.cu``): the
network's kernel module on a GPU (PyCUDA), and a whole plan run under host emulation (the same
sources compiled by g++; ``edgekit/kernels/cuda/emu/gmbinet_emu_main.cpp``).  The plan itself is
the shared one (:func:`edgekit.kernels.graph.plan_gmbinet`).
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.kernels.cuda.gmbi import kernel_build_dir, kernel_dir
from edgekit.kernels.cuda.module import _require_pycuda, load_module
from edgekit.kernels.graph import NP_DTYPES, FoldedGMBINet, NetPlan

LAYERS_SOURCE = "gmbinet_layers.cu"  # #includes gmbi_fused.cu: one module holds every network kernel


def layers_source_path() -> Path:
    path = kernel_dir() / LAYERS_SOURCE
    if not path.is_file():
        raise EdgekitError(f"the GMBINet layer kernels are missing: {path} (set EDGEKIT_KERNEL_DIR to the folder "
                           f"holding {LAYERS_SOURCE} and gmbi_fused.cu)")
    return path


# ----------------------------------------------------------------------------------------------
# host emulation of a whole plan (CPU test harness; see edgekit/kernels/cuda/emu/gmbinet_emu_main.cpp)


def _plan_text(plan: NetPlan, param_offsets: Dict[str, Tuple[int, int]]) -> str:
    lines = [f"params {len(param_offsets)}"]
    lines += [f"{off} {nb}" for off, nb in param_offsets.values()]
    lines.append(f"acts {len(plan.buffers)}")
    lines += [f"{b.offset} {b.nbytes}" for b in plan.buffers.values()]
    lines.append(f"launches {len(plan.launches)}")
    for ln in plan.launches:
        toks = [ln.kernel, ln.fmt, *map(str, ln.grid), *map(str, ln.block), str(ln.smem_bytes)]
        for kind, v in ln.args:
            if kind == "param":
                toks.append(f"p{param_offsets[v][0]}")
            elif kind == "act":
                toks.append(f"a{plan.buffers[v].offset}")
            elif kind == "int":
                toks.append(f"i{int(v)}")
            else:  # the exact fp32 bits
                toks.append(f"f{int(np.array(v, dtype=np.float32).view(np.uint32))}")
        lines.append(" ".join(toks))
    return "\n".join(lines) + "\n"


def run_net_emulated(exe: Union[str, Path], net: FoldedGMBINet, plan: NetPlan, x: np.ndarray,
                     timeout: float = 1800) -> Dict[str, np.ndarray]:
    """Run a whole plan under host emulation (``build_emulator(..., program="gmbinet")``) on a float32
    NCHW batch.  Activation buffers start poisoned with NaN (all bytes 0xFF); returns every buffer
    after the run, by name (``plan.output`` is the probability map)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    inp = plan.buffers[plan.input]
    if tuple(x.shape) != inp.shape:
        raise EdgekitError(f"run_net_emulated: x shape {x.shape} does not match the plan's {inp.shape}")
    blob, offsets = net.param_layout()
    acts = np.full(plan.act_bytes, 0xFF, dtype=np.uint8)
    acts[inp.offset:inp.offset + inp.nbytes] = np.frombuffer(x.tobytes(), np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "plan.txt").write_text(_plan_text(plan, offsets))
        blob.tofile(t / "params.bin")
        acts.tofile(t / "acts.bin")
        proc = subprocess.run([str(exe), str(t / "plan.txt"), str(t / "params.bin"), str(t / "acts.bin"),
                               str(t / "out.bin")], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise EdgekitError(f"emulated GMBINet failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        out = np.fromfile(t / "out.bin", dtype=np.uint8)
    if out.size != plan.act_bytes:
        raise EdgekitError(f"emulated GMBINet wrote {out.size} bytes, expected {plan.act_bytes}")
    return {name: out[b.offset:b.offset + b.nbytes].view(NP_DTYPES[b.dtype]).reshape(b.shape).copy()
            for name, b in plan.buffers.items()}


# ----------------------------------------------------------------------------------------------
# the network's kernel module on a GPU (PyCUDA)

def load_net_module(arch: Optional[str] = None, build_dir: Optional[Path] = None):
    """The ``pycuda.driver.Module`` holding every network kernel (``gmbinet_layers.cu``) for the
    current context: a prebuilt cubin/fatbin whose manifest matches the sources (in ``build_dir``, e.g.
    a cuda-fused artifact's ``kernels/``, else the default build folder), otherwise compiled at load
    time with ``pycuda.compiler`` (nvcc on PATH; see ``edgekit.kernels.cuda.module.load_module``)."""
    _require_pycuda()
    return load_module(layers_source_path(), Path(build_dir) if build_dir is not None else kernel_build_dir(), arch)


__all__ = ["LAYERS_SOURCE", "layers_source_path", "load_net_module", "run_net_emulated"]
