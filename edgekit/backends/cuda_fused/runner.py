"""``cuda-fused``: the whole eval-mode GMBINet as edgekit's own CUDA kernels, through PyCUDA.

``CudaFusedRunner(checkpoint, precision="fp16"|"fp32")`` folds every BatchNorm at load time
(``edgekit.kernels.fold.fold_gmbinet``), uploads all parameters once (one 256-byte aligned
device allocation), and for each batch size it is asked for plans the launch sequence with the
same planner the host-emulation tests run (``plan_gmbinet``), preallocates every activation buffer
(one allocation) and page-locked host staging buffers.  At batch 1 the launch sequence is
captured once in a CUDA graph and replayed per call; other batch sizes launch the kernels one by
one on the runner's stream.

PyCUDA is not known to expose stream capture / CUDA graphs, so capture goes straight to the
CUDA driver API (``cuStreamBeginCapture_v2`` / ``cuStreamEndCapture`` / ``cuGraphInstantiateWithFlags``
/ ``cuGraphLaunch`` from ``libcuda`` via ctypes) on the PyCUDA stream's handle; PyCUDA's own
launches on the capturing stream are recorded normally.  If capture fails the runner falls back to
sequential launches and says so in ``describe()``.

Without PyCUDA, or without a CUDA device, loading fails with one ``EdgekitError`` line.
**Status: not yet run on a GPU** (see ``kernels/README.md``): the kernels are checked by nvcc and,
launch sequence included, by host emulation on the CPU.

Load it with ``runtime.load(artifact)``, or a checkpoint with ``runtime.load(ckpt, backend="cuda-fused",
precision=...)`` (``load_cuda_fused``); checkpoints keep loading with PyTorch by default.
"""
from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from edgekit.errors import EdgekitError, MissingBackendError
from edgekit.models.checkpoint import Checkpoint, load_checkpoint
from edgekit.backends.base import Runner

PRECISIONS = {"fp16": "float16", "fp32": "float32"}
TARGET = "cuda-fused"


def _require_gpu():
    try:
        import pycuda.driver as drv
    except ImportError as e:
        if importlib.util.find_spec("pycuda") is None:
            raise MissingBackendError("the cuda-fused runtime", "pycuda") from None
        # PyCUDA is installed but its extension cannot load (typically: no libcuda.so, no driver)
        raise EdgekitError(f"the cuda-fused runtime cannot load PyCUDA (no CUDA driver?): {e}") from None
    try:
        drv.init()
        count = drv.Device.count()
    except Exception as e:  # pycuda.driver.Error, RuntimeError: no driver / no device
        raise EdgekitError(f"the cuda-fused runtime needs a CUDA GPU: {str(e).strip() or type(e).__name__}") from None
    if count < 1:
        raise EdgekitError("the cuda-fused runtime needs a CUDA GPU: none found")
    return drv


def _libcuda():
    return ctypes.CDLL("libcuda.so.1")


class _CudaGraph:
    """A CUDA graph captured from a stream with the driver API (ctypes on libcuda; ``lib`` for tests).
    Whatever fails during capture or instantiation, the partial graph is destroyed before the error
    propagates (a failed capture must not leak device memory per retry)."""

    CAPTURE_MODE_THREAD_LOCAL = 1

    def __init__(self, stream, enqueue, lib=None):
        self.lib = lib if lib is not None else _libcuda()
        self.graph, self.exec = ctypes.c_void_p(), ctypes.c_void_p()
        h = ctypes.c_void_p(int(stream.handle))
        self._check(self.lib.cuStreamBeginCapture_v2(h, ctypes.c_int(self.CAPTURE_MODE_THREAD_LOCAL)), "begin capture")
        try:
            enqueue()
        except BaseException:
            self.lib.cuStreamEndCapture(h, ctypes.byref(self.graph))  # ends the (invalidated) capture
            self.destroy()
            raise
        try:
            self._check(self.lib.cuStreamEndCapture(h, ctypes.byref(self.graph)), "end capture")
            self._check(self.lib.cuGraphInstantiateWithFlags(ctypes.byref(self.exec), self.graph,
                                                             ctypes.c_ulonglong(0)), "instantiate")
        except BaseException:
            self.destroy()
            raise

    def _check(self, rc: int, what: str):
        if rc != 0:
            raise EdgekitError(f"CUDA graph {what} failed (CUresult {rc})")

    def launch(self, stream):
        self._check(self.lib.cuGraphLaunch(self.exec, ctypes.c_void_p(int(stream.handle))), "launch")

    def destroy(self):
        if self.exec.value:
            self.lib.cuGraphExecDestroy(self.exec)
            self.exec = ctypes.c_void_p()
        if self.graph.value:
            self.lib.cuGraphDestroy(self.graph)
            self.graph = ctypes.c_void_p()

    def __del__(self):
        try:
            self.destroy()
        except Exception:
            pass


@dataclass
class _BatchState:
    plan: object
    acts: object  # DeviceAllocation
    launches: List[Tuple[object, list]]
    h_in: np.ndarray
    h_out: np.ndarray
    in_ptr: int
    out_ptr: int
    graph: Optional[_CudaGraph] = None
    graph_error: str = ""


class CudaFusedRunner(Runner):
    name = TARGET

    def __init__(self, checkpoint: Checkpoint, precision: str = "fp16", use_graph: bool = True,
                 kernel_build: Optional[Path] = None):
        if precision not in PRECISIONS:
            raise EdgekitError(f"cuda-fused: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        drv = _require_gpu()
        super().__init__(checkpoint.preprocess, checkpoint.path or Path("."),
                         {"checkpoint_sha256": checkpoint.sha256, "target": TARGET})
        from edgekit.kernels.cuda.gmbinet import load_net_module
        from edgekit.kernels.cuda.module import ensure_context
        from edgekit.kernels.fold import fold_gmbinet

        self.drv = drv
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.use_graph = use_graph
        self.checkpoint = checkpoint
        self.net = fold_gmbinet(checkpoint.build())
        if self.net.in_channels != self.spec.channels:
            raise EdgekitError(f"cuda-fused: the model takes {self.net.in_channels} channels, its preprocessing "
                               f"gives {self.spec.channels}")
        ctx = ensure_context()
        dev = ctx.get_device()
        self.sm_count = dev.get_attribute(drv.device_attribute.MULTIPROCESSOR_COUNT)
        self.smem_limit = dev.get_attribute(drv.device_attribute.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        module = load_net_module(build_dir=kernel_build)
        blob, self.param_offsets = self.net.param_layout()
        self.params = drv.to_device(blob)  # one allocation, 256-byte aligned base; offsets are 256-aligned
        self._fns: Dict[str, object] = {}
        self._module = module
        self._smem_opted: Dict[str, int] = {}
        self.stream = drv.Stream()
        self._states: Dict[int, _BatchState] = {}

    @classmethod
    def from_path(cls, path, precision: str = "fp16", **kw) -> "CudaFusedRunner":
        return cls(load_checkpoint(path), precision=precision, **kw)

    def _function(self, name: str, fmt: str, smem: int):
        from edgekit.kernels.graph import DEFAULT_SMEM_LIMIT_48K

        fn = self._fns.get(name)
        if fn is None:
            fn = self._module.get_function(name)
            fn.prepare(fmt)
            self._fns[name] = fn
        if smem > DEFAULT_SMEM_LIMIT_48K and self._smem_opted.get(name, 0) < smem:
            fn.set_attribute(self.drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
            self._smem_opted[name] = smem
        return fn

    def plan(self, n: int):
        from edgekit.kernels.graph import plan_gmbinet

        h, w = self.spec.input_size
        return plan_gmbinet(self.net, n, h, w, self.dtype, sm_count=self.sm_count, smem_limit=self.smem_limit)

    def _state(self, n: int) -> _BatchState:
        st = self._states.get(n)
        if st is not None:
            return st
        drv = self.drv
        plan = self.plan(n)
        acts = drv.mem_alloc(plan.act_bytes)
        drv.memset_d8(acts, 0xFF, plan.act_bytes)  # NaN poison: an element no kernel writes reads back as NaN
        launches = plan.resolve(self.param_offsets, int(self.params), int(acts))
        for ln, _ in launches:  # prepare + shared-memory opt-in outside any capture
            self._function(ln.kernel, ln.fmt, plan.max_smem(ln.kernel))
        inp, out = plan.buffers[plan.input], plan.buffers[plan.output]
        st = _BatchState(plan=plan, acts=acts, launches=launches,
                         h_in=drv.pagelocked_empty(inp.shape, np.float32),
                         h_out=drv.pagelocked_empty(out.shape, np.float32),
                         in_ptr=int(acts) + inp.offset, out_ptr=int(acts) + out.offset)
        if n == 1 and self.use_graph:
            self._enqueue(st)  # run once eagerly first (module loading, lazy init) before capturing
            self.stream.synchronize()
            try:
                st.graph = _CudaGraph(self.stream, lambda: self._enqueue(st))
            except Exception as e:  # no libcuda symbol, capture refused, a PyCUDA error: launch sequentially
                st.graph_error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        self._states[n] = st
        return st

    def _enqueue(self, st: _BatchState) -> None:
        for ln, vals in st.launches:
            self._fns[ln.kernel].prepared_async_call(ln.grid, ln.block, self.stream, *vals, shared_size=ln.smem_bytes)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        st = self._state(batch.shape[0])
        drv = self.drv
        st.h_in[...] = batch
        drv.memcpy_htod_async(st.in_ptr, st.h_in, self.stream)
        if st.graph is not None:
            st.graph.launch(self.stream)
        else:
            self._enqueue(st)
        drv.memcpy_dtoh_async(st.h_out, st.out_ptr, self.stream)
        self.stream.synchronize()
        return st.h_out.copy()

    def infer_device(self, x):
        """CUDA torch tensor (N x C x H x W) in, new CUDA torch tensor of probabilities out, without
        host copies: device-to-device copies into and out of the preallocated buffers around the
        graph (or the launches).  Synchronous; what ``edgekit bench --device gpu`` times."""
        import torch

        if not getattr(x, "is_cuda", False):
            where = getattr(x, "device", type(x).__name__)
            raise EdgekitError(f"{self.name}: infer_device takes a CUDA tensor, got one on {where}; "
                               f"use infer() for host arrays")
        x = x.to(torch.float32).contiguous()
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
            raise EdgekitError(f"{self.name}: expected a batch N x {' x '.join(map(str, self.input_shape))}, "
                               f"got {' x '.join(map(str, x.shape))}")
        st = self._state(int(x.shape[0]))
        out = torch.empty(st.plan.buffers[st.plan.output].shape, device=x.device, dtype=torch.float32)
        torch.cuda.current_stream(x.device).synchronize()  # x is complete before our stream reads it
        drv = self.drv
        drv.memcpy_dtod_async(st.in_ptr, x.data_ptr(), x.numel() * 4, self.stream)
        if st.graph is not None:
            st.graph.launch(self.stream)
        else:
            self._enqueue(st)
        drv.memcpy_dtod_async(out.data_ptr(), st.out_ptr, out.numel() * 4, self.stream)
        self.stream.synchronize()
        return out

    def close(self) -> None:
        """The CUDA graphs, every activation buffer and the parameters, freed now."""
        for st in self._states.values():
            if st.graph is not None:
                st.graph.destroy()
            st.acts.free()
        self._states.clear()
        if getattr(self, "params", None) is not None:
            self.params.free()
            self.params = None
        super().close()

    def describe(self) -> str:
        st = self._states.get(1)
        mode = "CUDA graph at batch 1" if st is not None and st.graph is not None else "sequential launches"
        if st is not None and st.graph_error:
            mode += f" (graph capture failed: {st.graph_error})"
        return f"{self.name} {self.precision} ({self.source}; {mode})"


def _is_cuda_fused_artifact(p: Path) -> bool:
    from edgekit.artifact import is_artifact, read_manifest

    return is_artifact(p) and read_manifest(p, verify=False).get("target") == TARGET


def _load(p, precision: Optional[str] = None, use_graph: bool = True, **_) -> CudaFusedRunner:
    """A checkpoint (precision default fp16) or a ``cuda-fused`` artifact folder (its own precision,
    its prebuilt kernels; verified first: signature when keys are trusted, paths, every file's sha256)."""
    from edgekit.artifact import VerifiedArtifact, verify_artifact

    if isinstance(p, VerifiedArtifact) or _is_cuda_fused_artifact(Path(p)):
        art = p if isinstance(p, VerifiedArtifact) else verify_artifact(p)
        man = art.manifest
        if precision not in (None, man["precision"]):
            raise EdgekitError(f"{art.folder} is a cuda-fused {man['precision']} artifact, not {precision}")
        kernels = art.folder / "kernels"
        if kernels.is_dir() and "kernels/manifest.json" not in man["files"]:
            raise EdgekitError(f"{art.folder}: its kernels/ folder is not covered by the manifest's hashes")
        runner = CudaFusedRunner(load_checkpoint(art.path(man["model_file"], "model_file")), precision=man["precision"],
                                 use_graph=use_graph, kernel_build=kernels if kernels.is_dir() else None)
        runner.source = art.folder
        return runner
    return CudaFusedRunner(load_checkpoint(Path(p)), precision=precision or "fp16", use_graph=use_graph)


def load_cuda_fused(path, precision: Optional[str] = None, use_graph: bool = True) -> CudaFusedRunner:
    """The cuda-fused runner for a GMBINet checkpoint (an edgekit checkpoint or a plain state_dict;
    fp16 unless ``precision`` says otherwise) or a ``cuda-fused`` artifact folder."""
    return _load(path, precision=precision, use_graph=use_graph)


class EmulatedCudaFusedRunner(Runner):
    """The cuda-fused launch plan run by the host emulator (the same ``.cu`` sources compiled with
    g++): a real, slow runner (about a minute per 512x512 image on 2 cores) that lets
    ``edgekit compile --target cuda-fused`` verify an artifact on a machine without a GPU."""

    name = "cuda-fused (host emulation)"

    def __init__(self, checkpoint: Checkpoint, precision: str = "fp16", exe: Optional[Path] = None,
                 sm_count: int = 132, smem_limit: int = 227 * 1024):
        if precision not in PRECISIONS:
            raise EdgekitError(f"cuda-fused: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        super().__init__(checkpoint.preprocess, checkpoint.path or Path("."), {"target": TARGET})
        from edgekit.kernels.fold import fold_gmbinet

        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.net = fold_gmbinet(checkpoint.build())
        self.exe = exe
        self.sm_count, self.smem_limit = sm_count, smem_limit

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        from edgekit.kernels.cuda.gmbinet import run_net_emulated
        from edgekit.kernels.graph import plan_gmbinet

        if self.exe is None:
            import tempfile

            from edgekit.kernels.cuda.build import build_emulator

            self._tmp = tempfile.TemporaryDirectory(prefix="edgekit-emu-")
            self.exe = build_emulator(Path(self._tmp.name) / "gmbinet_emu", sanitize="none", program="gmbinet", opt="-O2")
        h, w = self.spec.input_size
        plan = plan_gmbinet(self.net, batch.shape[0], h, w, self.dtype, sm_count=self.sm_count,
                            smem_limit=self.smem_limit)
        bufs = run_net_emulated(self.exe, self.net, plan, batch)
        out = bufs[plan.output].astype(np.float32)
        if np.isnan(out).any():
            raise EdgekitError("cuda-fused (host emulation): output elements were never written")
        return out

    def describe(self) -> str:
        return f"{self.name} {self.precision}, H100 launch plan ({self.source})"

    def close(self) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:  # the emulator this runner built
            tmp.cleanup()
            self._tmp, self.exe = None, None
        super().close()
