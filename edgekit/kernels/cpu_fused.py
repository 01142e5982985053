"""GMBINet on edgekit's fused CPU kernels (``edgekit/kernels/cpu/gmbinet_cpu.cpp``): build, load, plan.

One C++17 source, compiled with the system compiler once per ISA level (``ISA_LEVELS``: AVX2+FMA, the
baseline, and AVX-512), loaded through ``ctypes``.  The launch sequence, the buffer layout and every
layer's shapes, nearest-resize scales and parameter offsets are the GPU path's: ``plan_gmbinet`` and
``fold_gmbinet`` of :mod:`edgekit.kernels.gmbinet`.  What is CPU-specific is only how a launch is cut into
work: bands of full-width rows sized to the L2 cache (:func:`band_rows`) instead of CUDA blocks.

Nothing here runs at import; building needs a C++ compiler, loading needs only the built library.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.kernels.gmbi import HALO_R1, HALO_R2, HALO_R3
from edgekit.kernels.gmbinet import FoldedGMBINet, NetPlan, plan_gmbinet

SOURCE_NAME = "gmbinet_cpu.cpp"
ABI_VERSION = 3
CXX_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno")  # never -ffast-math: see vsigmoid_pos()
# ISA level -> (compiler flags, CPU features it needs as numpy's CPU dispatcher names them), fastest first.
ISA_LEVELS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "avx512": (("-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mfma", "-mavx2"), ("AVX512F", "AVX512_SKX")),
    "avx2": (("-mavx2", "-mfma"), ("AVX2", "FMA3")),
}
OP_KINDS = {"stem": 0, "s2": 1, "pw": 2, "up": 3, "gmbi": 4, "head": 5, "up+head": 6}
PANEL_BYTES = 192 * 1024  # a band's panel (K x P floats) targets this much of the 512 KB L2


def source_path() -> Path:
    path = Path(__file__).resolve().parent / "cpu" / SOURCE_NAME
    if not path.is_file():
        raise EdgekitError(f"the cpu-fused kernel source is missing: {path} (edgekit installed without its package data?)")
    return path


# ----------------------------------------------------------------------------------------------
# the CPU and the compiler


def cpu_features() -> Dict[str, bool]:
    """What this CPU (and OS) supports, as numpy's runtime CPU dispatcher detected it."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return dict(__cpu_features__)


def supported_isas(features: Optional[Dict[str, bool]] = None) -> List[str]:
    feats = cpu_features() if features is None else features
    return [isa for isa, (_, needs) in ISA_LEVELS.items() if all(feats.get(f) for f in needs)]


def cpu_description() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return model


def choose_isa(available: Sequence[str], features: Optional[Dict[str, bool]] = None) -> str:
    """The fastest of ``available`` (the artifact's libraries) this CPU runs; one line if none."""
    runnable = supported_isas(features)
    for isa in ISA_LEVELS:
        if isa in available and isa in runnable:
            return isa
    feats = cpu_features() if features is None else features
    have = [f for f in ("AVX2", "FMA3", "AVX512F", "AVX512_SKX", "AVX512VNNI") if feats.get(f)]
    needs = " or ".join(f"{isa} ({'+'.join(ISA_LEVELS[isa][1])})" for isa in available if isa in ISA_LEVELS)
    raise EdgekitError(f"this CPU ({cpu_description()}: {', '.join(have) or 'no AVX2'}) cannot run the cpu-fused "
                       f"artifact: it was built for {needs or 'an unknown ISA'}")


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


def build_library(isa: str, out: Path, cxx: Optional[str] = None) -> dict:
    """Compile the kernel source for one ISA level into ``out`` (a shared library)."""
    if isa not in ISA_LEVELS:
        raise EdgekitError(f"cpu-fused: unknown ISA level {isa!r} (choose from {', '.join(ISA_LEVELS)})")
    cxx = cxx or find_compiler()
    flags = [*CXX_FLAGS, *ISA_LEVELS[isa][0]]
    cmd = [cxx, *flags, "-o", str(out), str(source_path()), "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EdgekitError(f"cpu-fused: {Path(cxx).name} failed to build the {isa} kernels:\n{proc.stderr[-3000:]}")
    return {"isa": isa, "compiler": compiler_version(cxx), "flags": flags}


# ----------------------------------------------------------------------------------------------
# the library


class EkOp(ctypes.Structure):
    """One planned layer, as ``EkOp`` in gmbinet_cpu.cpp."""

    _fields_ = [("kind", ctypes.c_int32), ("n", ctypes.c_int32), ("band", ctypes.c_int32), ("pad", ctypes.c_int32),
                ("ptr", ctypes.c_int64 * 10), ("i", ctypes.c_int32 * 12), ("f", ctypes.c_float * 4)]


_LIBRARY_FDS: List[int] = []


class CpuKernels:
    """A loaded kernel library and its persistent worker pool (``threads`` workers, the caller included)."""

    def __init__(self, library: Path, threads: int = 1, *, _load_path: Optional[str] = None):
        try:
            lib = ctypes.CDLL(_load_path or str(library))
        except OSError as e:
            raise EdgekitError(f"cpu-fused: cannot load {library}: {e}") from None
        for name, res, args in (("ek_isa", ctypes.c_char_p, []), ("ek_abi_version", ctypes.c_int, []),
                                ("ek_vector_width", ctypes.c_int, []),
                                ("ek_gmbi_halos", None, [ctypes.POINTER(ctypes.c_int)]),
                                ("ek_pool_create", ctypes.c_void_p, [ctypes.c_int]),
                                ("ek_pool_destroy", None, [ctypes.c_void_p]),
                                ("ek_run", ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(EkOp), ctypes.c_int,
                                                          ctypes.POINTER(ctypes.c_double), ctypes.c_int])):
            fn = getattr(lib, name, None)
            if fn is None:
                raise EdgekitError(f"cpu-fused: {library} is not an edgekit kernel library (no {name})")
            fn.restype, fn.argtypes = res, args
        if lib.ek_abi_version() != ABI_VERSION:
            raise EdgekitError(f"cpu-fused: {library} has kernel ABI {lib.ek_abi_version()}, this edgekit needs {ABI_VERSION}")
        halos = (ctypes.c_int * 3)()
        lib.ek_gmbi_halos(halos)
        if tuple(halos) != (HALO_R1, HALO_R2, HALO_R3):  # one design: the GPU kernel's halo arithmetic
            raise EdgekitError(f"cpu-fused: {library} uses GMBI halos {tuple(halos)}, the planner {(HALO_R1, HALO_R2, HALO_R3)}")
        self.lib = lib
        self.isa = lib.ek_isa().decode()
        self.vector_width = lib.ek_vector_width()
        self.threads = max(1, int(threads))
        self._pool = lib.ek_pool_create(self.threads)

    @classmethod
    def from_bytes(cls, data: bytes, name: str, threads: int = 1) -> "CpuKernels":
        """Load a library from bytes already verified, never from its path again (no window between the
        check and the load): the bytes go into a sealed memfd and the loader opens ``/proc/self/fd/N``.
        Without memfd (not Linux): a private temporary copy of the same bytes."""
        if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
            import fcntl

            fd = os.memfd_create("edgekit-" + Path(name).name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            view, done = memoryview(data), 0
            while done < len(data):
                done += os.write(fd, view[done:])
            if os.fstat(fd).st_size != len(data):
                os.close(fd)
                raise EdgekitError(f"cpu-fused: cannot stage {name} in memory")
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                        | fcntl.F_SEAL_SEAL)
            # Never closed: ctypes never unloads a library, and the loader matches a later dlopen of the
            # same /proc/self/fd/N name to the library already loaded; a reused fd number would do that.
            _LIBRARY_FDS.append(fd)
            return cls(Path(name), threads, _load_path=f"/proc/self/fd/{fd}")
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="edgekit-kernels-"))  # 0700: nobody else can swap the copy
        copy = tmp / Path(name).name
        copy.write_bytes(data)
        return cls(Path(name), threads, _load_path=str(copy))

    def run(self, ops, timings: Optional[np.ndarray] = None, cpu_clock: bool = False) -> None:
        """Run a program; ``timings`` (float64, one per op) accumulates each op's milliseconds: wall time,
        or with ``cpu_clock`` the calling thread's CPU time (preemption-free, for 1-thread profiles)."""
        ms = timings.ctypes.data_as(ctypes.POINTER(ctypes.c_double)) if timings is not None else None
        rc = self.lib.ek_run(self._pool, ops, len(ops), ms, int(cpu_clock))
        if rc != 0:
            raise EdgekitError(f"cpu-fused: op {-rc - 1} of the program is invalid")

    def close(self):
        if getattr(self, "_pool", None):
            self.lib.ek_pool_destroy(self._pool)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------------------------
# from the GPU plan to a CPU program


def band_rows(kind: str, n: int, rows: int, width: int, panel_channels: int, threads: int,
              panel_bytes: int = PANEL_BYTES) -> int:
    """Rows per band (a task: full-width rows of one image).

    GMBI: as few bands as keep every thread busy (two per thread at batch 1, for dynamic balance on a
    shared machine), because each band recomputes up to 2 x 10 halo rows of the depthwise chain; its
    K x P panel then lives in L2/L3, which the measurements showed costs less than the halo.  Other
    layers (halo 0 or 1): the band's panel near ``panel_bytes``, at least two bands per thread."""
    if kind == "gmbi":
        per_image = max(1, -(-2 * threads // n))
        return max(min(rows, 8), -(-rows // per_image))
    r = max(1, min(rows, panel_bytes // max(1, 4 * panel_channels * width)))
    while r > 1 and n * -(-rows // r) < 2 * threads:
        r = -(-r // 2)
    return r


GMBI_MODES = {"banded": 0, "two-phase": 1}  # EkOp.i[3] of a gmbi op, as in gmbinet_cpu.cpp
GMBI_TWO_PHASE_MAX_ROWS = 64


def gmbi_mode(rows: int) -> str:
    """How a GMBI module of ``rows`` image rows is cut into tasks.  banded: a task = a band of rows through
    the whole module, its halo (up to 10 rows either side) recomputed; two-phase: the chain per (image,
    lane) over the whole image, then the 1x1 per band.  A band's halo is a fixed 2 x 10 rows, so it is the
    small images (stages 3-5 at 512 px) where it costs more than two-phase's z round trip through memory;
    the 64-row threshold is measured at batch 1 (kernels/README.md), and kept at larger batches, where
    two-phase still balances better (lanes x images tasks)."""
    return "two-phase" if rows <= GMBI_TWO_PHASE_MAX_ROWS else "banded"


def _ints(vals: Iterable) -> List[int]:
    return [int(v) for v in vals]


def _fill(op: EkOp, kind: str, n: int, vals: Sequence, nptr: int, threads: int, panel_bytes: int) -> None:
    op.kind, op.n = OP_KINDS[kind], n
    for k in range(nptr):
        op.ptr[k] = int(vals[k])
    scal = vals[nptr:]
    if kind == "stem":  # cin, cout, H, W, h1, w1
        ints = _ints(scal[:6])
        op.band = band_rows(kind, n, ints[4], ints[5], ints[0] * 9, threads, panel_bytes)
    elif kind in ("s2", "pw", "up"):  # cin cout ho wo hi wi hh wh sh sw (then the GPU's tiling, unused here)
        ints = _ints(scal[:8])
        op.f[0], op.f[1] = float(scal[8]), float(scal[9])
        op.band = band_rows(kind, n, ints[2], ints[3], ints[0], threads, panel_bytes)
    elif kind == "gmbi":  # C H W (then the GPU's tiling)
        ints = _ints(scal[:3])
        mode = gmbi_mode(ints[1])
        ints.append(GMBI_MODES[mode])
        # two-phase: the bands are only the 1x1's (halo 0), sized like any other layer's
        op.band = band_rows("gmbi" if mode == "banded" else "pw", n, ints[1], ints[2], ints[0], threads, panel_bytes)
    elif kind == "head":  # cin cout h1 w1 H W sh sw
        ints = _ints(scal[:6])
        op.f[0], op.f[1] = float(scal[6]), float(scal[7])
        op.band = band_rows(kind, n, ints[2], ints[3], ints[0], threads, panel_bytes)
    else:  # pragma: no cover - the planner emits only these
        raise EdgekitError(f"cpu-fused: no CPU kernel for launch kind {kind!r}")
    for k, v in enumerate(ints):
        op.i[k] = v


def build_program(plan: NetPlan, param_offsets: Dict[str, Tuple[int, int]], param_base: int, act_base: int,
                  threads: int, panel_bytes: int = PANEL_BYTES, fuse_head: bool = True):
    """(ctypes array of ``EkOp``, [the plan layers each op runs]): the plan's launches in order, with
    resolved pointers, the GPU kernels' shape arguments and CPU bands in place of CUDA grids.

    ``fuse_head``: DF1 and the head become one op (DF1's output never leaves the band's scratch; the
    plan's ``d1`` buffer is then left unwritten)."""
    resolved = plan.resolve(param_offsets, param_base, act_base)
    program: List[Tuple[EkOp, List[str]]] = []
    k = 0
    while k < len(resolved):
        ln, vals = resolved[k]
        nptr = len(ln.fmt) - len(ln.fmt.lstrip("P"))
        op = EkOp()
        nxt = resolved[k + 1][0] if k + 1 < len(resolved) else None
        if (fuse_head and ln.kind == "up" and nxt is not None and nxt.kind == "head"
                and nxt.args[0] == ln.args[2]):  # the head reads exactly this DF's output
            _fill(op, "up", plan.n, vals, nptr, threads, panel_bytes)
            hvals = resolved[k + 1][1]  # d1, output, w, b, cin, cout, h1, w1, H, W, sh, sw
            op.kind = OP_KINDS["up+head"]
            op.ptr[2] = int(hvals[1])
            op.ptr[7], op.ptr[8] = int(hvals[2]), int(hvals[3])
            op.i[8], op.i[9], op.i[10] = int(hvals[5]), int(hvals[8]), int(hvals[9])
            op.f[2], op.f[3] = float(hvals[10]), float(hvals[11])
            program.append((op, [ln.layer, nxt.layer]))
            k += 2
            continue
        _fill(op, ln.kind, plan.n, vals, nptr, threads, panel_bytes)
        if ln.kind == "gmbi" and f"{ln.layer}.pw_q" in param_offsets:  # the INT8 1x1 (quantize_gmbi_1x1)
            op.i[4] = 1
            op.ptr[6] = param_base + param_offsets[f"{ln.layer}.pw_q"][0]
            op.ptr[7] = param_base + param_offsets[f"{ln.layer}.pw_qscale"][0]
            op.f[0] = ctypes.c_float.from_address(param_base + param_offsets[f"{ln.layer}.pw_qinv"][0]).value
        program.append((op, [ln.layer]))
        k += 1
    ops = (EkOp * len(program))(*[op for op, _ in program])
    return ops, [layers for _, layers in program]


def _aligned(nbytes: int, align: int = 64) -> np.ndarray:
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes]


class FusedNet:
    """The whole network on the CPU kernels: folded parameters (one blob) + a program per batch size."""

    def __init__(self, kernels: CpuKernels, net: FoldedGMBINet, blob: np.ndarray,
                 offsets: Dict[str, Tuple[int, int]], panel_bytes: int = PANEL_BYTES, fuse_head: bool = True):
        self.kernels, self.net, self.offsets, self.panel_bytes = kernels, net, offsets, panel_bytes
        self.fuse_head = fuse_head
        # the last guard before native code: every parameter inside the blob (the manifest's layout was
        # checked against the net by the runner; this holds for any caller)
        for pname, (off, nb) in offsets.items():
            if not (0 <= int(off) and 0 <= int(nb) and int(off) + int(nb) <= blob.nbytes):
                raise EdgekitError(f"cpu-fused: parameter {pname} at [{off}, {off}+{nb}) lies outside the "
                                   f"{blob.nbytes}-byte weights")
        self.params = _aligned(blob.nbytes)
        self.params[:] = blob
        self._states: Dict[Tuple[int, int, int], tuple] = {}
        self._io: Dict[Tuple[int, int, int], dict] = {}
        self._lock = threading.Lock()

    def state(self, n: int, height: int, width: int):
        key = (n, height, width)
        if key not in self._states:
            plan = plan_gmbinet(self.net, n, height, width, "float32", channel_multiple=1)
            acts = _aligned(plan.act_bytes)
            acts.fill(0xFF)  # NaN: a buffer a kernel forgot to write shows up in the output
            ops, layers = build_program(plan, self.offsets, self.params.ctypes.data, acts.ctypes.data,
                                        self.kernels.threads, self.panel_bytes, self.fuse_head)
            self._states[key] = (plan, acts, ops, layers)
            # where the program reads the input and writes the output: forward() points those at the
            # caller's batch and a fresh result array (no copies of 3 MB in and 1 MB out per 512x512 image)
            io = {plan.input: [], plan.output: []}
            for name, slots in io.items():
                addr = acts.ctypes.data + plan.buffers[name].offset
                slots += [(k, j) for k, op in enumerate(ops) for j in range(len(op.ptr)) if op.ptr[j] == addr]
            self._io[key] = io
        return self._states[key]

    def _point(self, key, name: str, addr: int) -> None:
        for k, j in self._io[key][name]:
            self._states[key][2][k].ptr[j] = addr

    def view(self, plan: NetPlan, acts: np.ndarray, name: str) -> np.ndarray:
        b = plan.buffers[name]
        return acts[b.offset:b.offset + b.nbytes].view(np.float32).reshape(b.shape)

    def forward(self, x: np.ndarray, *, poison: bool = False, timings: Optional[np.ndarray] = None,
                cpu_clock: bool = False, buffers: bool = False):
        """Probabilities ``N x out x H x W`` for a float32 NCHW batch (``buffers``: every buffer, by name)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self.net.in_channels:
            raise EdgekitError(f"cpu-fused: expected N x {self.net.in_channels} x H x W, got {x.shape}")
        with self._lock:  # one call at a time: the program, its arena and the worker pool are shared
            return self._forward(x, poison, timings, cpu_clock, buffers)

    def _forward(self, x, poison, timings, cpu_clock, buffers):
        key = (x.shape[0], *x.shape[2:])
        plan, acts, ops, _ = self.state(*key)
        if poison:
            acts.fill(0xFF)
        if buffers:  # every buffer, the input and output included, in the plan's own memory
            for name in (plan.input, plan.output):
                self._point(key, name, acts.ctypes.data + plan.buffers[name].offset)
            self.view(plan, acts, plan.input)[...] = x
            self.kernels.run(ops, timings, cpu_clock)
            return {name: self.view(plan, acts, name).copy() for name in plan.buffers}
        out = np.empty(plan.buffers[plan.output].shape, dtype=np.float32)
        if poison:
            out.fill(np.nan)
        self._point(key, plan.input, x.ctypes.data)
        self._point(key, plan.output, out.ctypes.data)
        try:
            self.kernels.run(ops, timings, cpu_clock)
        finally:  # never leave the program pointing at memory the caller may free
            self._point(key, plan.input, acts.ctypes.data + plan.buffers[plan.input].offset)
            self._point(key, plan.output, acts.ctypes.data + plan.buffers[plan.output].offset)
        return out


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


__all__ = ["ISA_LEVELS", "CpuKernels", "EkOp", "FusedNet", "band_rows", "build_library", "build_program",
           "choose_isa", "cpu_description", "cpu_features", "find_compiler", "gmbi_1x1_ranges", "quantize_gmbi_1x1",
           "source_path", "supported_isas"]
