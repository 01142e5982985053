"""Loading edgekit's CUDA sources as PyCUDA modules: the one loader behind
``edgekit.kernels.cuda.gmbi.load_kernel_module`` (the GMBI kernel) and
``edgekit.kernels.cuda.gmbinet.load_net_module`` (every network kernel).

For a source file and the device's ``sm_XY`` it uses a prebuilt cubin/fatbin whose build manifest
matches the source's digest, else compiles the source at load time with ``pycuda.compiler`` (which
needs ``nvcc`` on PATH). Either way the toolkit must not be newer than the driver: a CUDA 12.x
driver (JetPack 6 on a Jetson Orin, sm_87) cannot load PTX or cubins from a CUDA 13 toolkit, so that
mismatch is refused with one line before anything is loaded.

Nothing here imports PyCUDA at module import time.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple

from edgekit.errors import EdgekitError, MissingBackendError
from edgekit.kernels.sources import source_digest  # noqa: F401  (re-exported: the manifest's digest)

NVCC_FLAGS = ("-O3", "-std=c++17")


def _require_pycuda():
    try:
        import pycuda.driver as drv
        import pycuda.gpuarray as gpuarray
    except ImportError:
        raise MissingBackendError("the fused CUDA kernel", "pycuda") from None
    return drv, gpuarray


# ----------------------------------------------------------------------------------------------
# the context: the device's primary context, current in every thread that asks

_PRIMARY: Dict[str, object] = {}
_PRIMARY_LOCK = threading.Lock()


def _pop_quietly(ctx) -> None:
    try:
        ctx.pop()
    except Exception:  # already popped or the driver is shutting down
        pass


def ensure_context():
    """The current CUDA context; when none is current in this thread, the device's **primary**
    context (``$CUDA_DEVICE``, default 0) is retained once per process and pushed here.

    The primary context is the one the CUDA runtime uses, so PyTorch / TensorRT buffers and streams
    are valid with it. PyCUDA's context stack is per thread: a thread other than the one that first
    pushed it (a server worker, say) has no current context and gets the primary context pushed too
    (``pycuda.autoprimaryctx`` does this only in the thread that imports it first)."""
    drv, _ = _require_pycuda()
    drv.init()
    ctx = drv.Context.get_current()
    if ctx is not None:
        return ctx
    with _PRIMARY_LOCK:
        primary = _PRIMARY.get("ctx")
        if primary is None:
            primary = drv.Device(int(os.environ.get("CUDA_DEVICE", "0"))).retain_primary_context()
            _PRIMARY["ctx"] = primary
    primary.push()
    if threading.current_thread() is threading.main_thread():
        atexit.register(_pop_quietly, primary)  # as pycuda.autoprimaryctx: leave the stack empty at exit
    return primary


def release_context() -> None:
    """Pop the primary context from this thread's stack if :func:`ensure_context` pushed it (call it
    before a worker thread ends: PyCUDA warns about a non-empty context stack at thread exit)."""
    drv, _ = _require_pycuda()
    primary = _PRIMARY.get("ctx")
    if primary is not None and drv.Context.get_current() is not None and hash(drv.Context.get_current()) == hash(primary):
        _pop_quietly(primary)


# ----------------------------------------------------------------------------------------------
# toolkit and driver versions

_VERSION_FORMS = (re.compile(r"release (\d+)\.(\d+)"), re.compile(r"cuda_(\d+)\.(\d+)"),
                  re.compile(r"^\s*(\d+)\.(\d+)\s*$"))


def parse_cuda_version(text: str) -> Optional[Tuple[int, int]]:
    """(major, minor) from ``nvcc --version`` output (``release 13.0``, ``Build cuda_13.0.r13.0/...``)
    or a plain ``12.6``."""
    for form in _VERSION_FORMS:
        m = form.search(text or "")
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def nvcc_cuda_version(nvcc: str) -> Optional[Tuple[int, int]]:
    try:
        proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_cuda_version(proc.stdout + proc.stderr)


def driver_cuda_version(drv) -> Optional[Tuple[int, int]]:
    """The CUDA version the installed driver supports (``cuDriverGetVersion``: 12060 -> (12, 6))."""
    try:
        v = int(drv.get_driver_version())
    except Exception:  # an old PyCUDA without the call: no check
        return None
    return v // 1000, (v % 1000) // 10


def fmt_version(v: Tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def toolkit_driver_problem(toolkit: Optional[Tuple[int, int]], driver: Optional[Tuple[int, int]],
                           what: str) -> Optional[str]:
    """Why code from CUDA ``toolkit`` cannot load on a driver of CUDA ``driver`` (None if it can)."""
    if toolkit is None or driver is None or toolkit <= driver:
        return None
    return (f"{what} CUDA {fmt_version(toolkit)}, newer than this driver's CUDA {fmt_version(driver)}, which cannot "
            f"load its PTX or cubins: build the kernels with the CUDA toolkit matching the driver (a Jetson Orin on "
            f"JetPack 6 has CUDA 12.x: build on the board or with its CUDA 12 toolkit)")


# ----------------------------------------------------------------------------------------------
# prebuilt artifacts and the load-time compile

def prebuilt_artifact(source: Path, arch: str, build_dir: Path) -> Tuple[Optional[Path], dict]:
    """(the prebuilt cubin/fatbin of ``source`` for ``arch`` in ``build_dir``, the build manifest),
    or (None, {}) when there is none or it was built from another version of the source."""
    build_dir = Path(build_dir)
    try:
        meta = json.loads((build_dir / "manifest.json").read_text())
        entry = meta["sources"][Path(source).name]
        if entry.get("sha256") != source_digest(source):
            return None, {}  # stale: built from other sources
        name = entry.get("artifacts", {}).get(arch)
    except (ValueError, OSError, KeyError, TypeError, AttributeError):
        return None, {}
    path = build_dir / name if name else None
    return (path, meta) if path is not None and path.is_file() else (None, {})


_MODULES: Dict[Tuple, object] = {}


def find_nvcc() -> Optional[str]:
    return shutil.which("nvcc")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load_module(source: Path, build_dir: Path, arch: Optional[str] = None):
    """The ``pycuda.driver.Module`` of ``source`` for the current context (cached per context, arch,
    source and build folder)."""
    drv, _ = _require_pycuda()
    ctx = ensure_context()
    if arch is None:
        major, minor = ctx.get_device().compute_capability()
        arch = f"sm_{major}{minor}"
    source, build_dir = Path(source), Path(build_dir)
    key = (hash(ctx), arch, str(source), str(build_dir))  # pycuda hashes a Context by its CUcontext handle
    if key in _MODULES:
        return _MODULES[key]
    driver = driver_cuda_version(drv)
    path, meta = prebuilt_artifact(source, arch, build_dir)
    if path is not None:
        problem = toolkit_driver_problem(parse_cuda_version(str(meta.get("cuda_version") or meta.get("nvcc") or "")),
                                         driver, f"{path} was built with")
        if problem:
            raise EdgekitError(problem)
        try:
            module = drv.module_from_file(str(path))
        except Exception as e:  # pycuda.driver.LogicError etc.: one line
            raise EdgekitError(f"cannot load the prebuilt kernels {path}: {_first_line(e)}") from None
    else:
        nvcc = find_nvcc()
        if nvcc is None:
            raise EdgekitError(
                f"no prebuilt {source.name} kernels for {arch} in {build_dir} and nvcc is not on PATH: they are compiled "
                f"when loaded, so install the CUDA toolkit matching the driver and put nvcc on PATH (or load a "
                f"cuda-fused artifact built where nvcc was: edgekit compile --target cuda-fused)")
        problem = toolkit_driver_problem(nvcc_cuda_version(nvcc), driver, f"nvcc ({nvcc}) is")
        if problem:
            raise EdgekitError(problem)
        from pycuda.compiler import compile as nvcc_compile

        try:
            cubin = nvcc_compile(source.read_text(), nvcc=nvcc, options=list(NVCC_FLAGS), no_extern_c=True,
                                 arch=arch, include_dirs=[str(source.parent)])
            module = drv.module_from_buffer(cubin)
        except Exception as e:  # pycuda.driver.CompileError (multi-line nvcc log), LogicError
            raise EdgekitError(f"compiling {source.name} for {arch} failed: {_first_line(e)}") from None
    _MODULES[key] = module
    return module
