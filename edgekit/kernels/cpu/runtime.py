"""GMBINet on edgekit's fused CPU kernels (``gmbinet_cpu.cpp`` beside this file), the device side: load a
built library, turn the shared plan into its op program, run it.  numpy and ctypes only: no torch, no
compiler (building the library and the INT8 calibration are :mod:`edgekit.kernels.cpu.build`).

The launch sequence, the buffer layout and every layer's shapes, nearest-resize scales and parameter
offsets are the shared graph's (:func:`edgekit.kernels.graph.plan_gmbinet`, the folded parameters'
:meth:`~edgekit.kernels.graph.FoldedGMBINet.param_layout`).  What is CPU-specific is only how a launch is cut
into work: bands of full-width rows sized to the L2 cache (:func:`band_rows`) instead of CUDA blocks.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.kernels.graph import HALO_R1, HALO_R2, HALO_R3, FoldedGMBINet, NetPlan, plan_gmbinet

SOURCE_NAME = "gmbinet_cpu.cpp"
ABI_VERSION = 4  # 4: typed op structs, their layout checked at load (ek_op_layout)
# ISA level -> (compiler flags, CPU features it needs as numpy's CPU dispatcher names them; AMX_* from
# /proc/cpuinfo, which numpy does not report), fastest first among the default levels.
_AVX512_FLAGS = ("-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mfma", "-mavx2")
ISA_LEVELS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "avx512": (_AVX512_FLAGS, ("AVX512F", "AVX512_SKX")),
    "avx2": (("-mavx2", "-mfma"), ("AVX2", "FMA3")),
    # the avx512 kernels with the GMBI modules' 1x1 in bf16 on AMX tiles (fp32 accumulation; kernels/README.md)
    # and the GMBI depthwise chain in fp16 (AVX512-FP16; every AMX CPU so far has it)
    "avx512amx": ((*_AVX512_FLAGS, "-mamx-tile", "-mamx-bf16", "-mavx512fp16"),
                  ("AVX512F", "AVX512_SKX", "AVX512FP16", "AMX_TILE", "AMX_BF16")),
}
# Levels that change the arithmetic (bf16 products): never chosen by default, and built only into a cpu-fused
# artifact of precision bf16 (compile --precision bf16), so an fp32 artifact's parity budget and the fp32 kernel
# tests hold every default level to fp32.
OPT_IN_ISAS = ("avx512amx",)
DEFAULT_ISAS = tuple(isa for isa in ISA_LEVELS if isa not in OPT_IN_ISAS)
OP_KINDS = {"stem": 0, "s2": 1, "pw": 2, "up": 3, "gmbi": 4, "head": 5, "up+head": 6}
PANEL_BYTES = 192 * 1024  # a band's panel (K x P floats) targets this much of the 512 KB L2


def source_path() -> Path:
    path = Path(__file__).resolve().parent / SOURCE_NAME
    if not path.is_file():
        raise EdgekitError(f"the cpu-fused kernel source is missing: {path} (edgekit installed without its package data?)")
    return path


# ----------------------------------------------------------------------------------------------
# the CPU


def cpu_features() -> Dict[str, bool]:
    """What this CPU (and OS) supports, as numpy's runtime CPU dispatcher detected it."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    feats = dict(__cpu_features__)
    flags: set = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    feats["AMX_TILE"], feats["AMX_BF16"] = "amx_tile" in flags, "amx_bf16" in flags
    return feats


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
    """The fastest of ``available`` (the artifact's libraries) this CPU runs; one line if none.  An opt-in level
    (``OPT_IN_ISAS``) only when it is the one level asked for."""
    runnable = supported_isas(features)
    for isa in ISA_LEVELS:
        if isa in OPT_IN_ISAS and list(available) != [isa]:
            continue
        if isa in available and isa in runnable:
            return isa
    feats = cpu_features() if features is None else features
    have = [f for f in ("AVX2", "FMA3", "AVX512F", "AVX512_SKX", "AVX512VNNI") if feats.get(f)]
    needs = " or ".join(f"{isa} ({'+'.join(ISA_LEVELS[isa][1])})" for isa in available if isa in ISA_LEVELS)
    raise EdgekitError(f"this CPU ({cpu_description()}: {', '.join(have) or 'no AVX2'}) cannot run the cpu-fused "
                       f"artifact: it was built for {needs or 'an unknown ISA'}")


# ----------------------------------------------------------------------------------------------
# the library


# The op program's structs, field for field as in gmbinet_cpu.cpp (which documents each); pointers are addresses
# (c_void_p).  CpuKernels compares them with the library's ek_op_layout() before running anything.
_P, _I, _F = ctypes.c_void_p, ctypes.c_int32, ctypes.c_float


def _fields(pointers: str, ints: str = "", floats: str = "") -> list:
    return [(n, _P) for n in pointers.split()] + [(n, _I) for n in ints.split()] + [(n, _F) for n in floats.split()]


class EkStemOp(ctypes.Structure):
    _fields_ = _fields("x w b out", "cin cout H W h1 w1")


class EkDwpwOp(ctypes.Structure):
    _fields_ = _fields("x high dw_w dw_b pw_wt pw_b out", "cin cout ho wo hi wi hh wh", "sh sw")


class EkUpHeadOp(ctypes.Structure):
    _fields_ = [("up", EkDwpwOp), *_fields("head_w head_b", "head_cout H W", "head_sh head_sw")]


class EkGmbiOp(ctypes.Structure):
    _fields_ = _fields("x dw_w dw_b pw_wt pw_b out pw_q pw_qscale", "C H W mode", "pw_qinv")


class EkHeadOp(ctypes.Structure):
    _fields_ = _fields("x w b out", "cin cout h1 w1 H W", "sh sw")


class EkOpArgs(ctypes.Union):
    _fields_ = [("stem", EkStemOp), ("dwpw", EkDwpwOp), ("up_head", EkUpHeadOp), ("gmbi", EkGmbiOp), ("head", EkHeadOp)]


class EkOp(ctypes.Structure):
    """One planned layer, as ``EkOp`` in gmbinet_cpu.cpp: ``u`` holds the member ``OP_MEMBER`` names for its kind."""

    _fields_ = [("kind", _I), ("n", _I), ("band", _I), ("flags", _I), ("u", EkOpArgs)]

    @property
    def args(self) -> ctypes.Structure:
        """This op's typed arguments (a view into the op: setting a field sets it in the program)."""
        return getattr(self.u, OP_MEMBER[KIND_NAMES[self.kind]])


# EkOp.flags: which of an op's activation buffers the library stores as fp16 (see half_storage)
EK_FLAGS = {"x_half": 1, "out_half": 2}
OP_STRUCTS = (EkStemOp, EkDwpwOp, EkUpHeadOp, EkGmbiOp, EkHeadOp, EkOpArgs, EkOp)
KIND_NAMES = {v: k for k, v in OP_KINDS.items()}
OP_MEMBER = {"stem": "stem", "s2": "dwpw", "pw": "dwpw", "up": "dwpw", "up+head": "up_head", "gmbi": "gmbi",
             "head": "head"}


def op_layout() -> Dict[str, Tuple[int, int]]:
    """{"Struct": (0, size), "Struct.field": (offset, size), "kind.K": (code, 0), "gmbi_mode.M": (code, 0)}: what
    the library's ``ek_op_layout()`` must report, entry for entry."""
    out: Dict[str, Tuple[int, int]] = {}
    for cls in OP_STRUCTS:
        out[cls.__name__] = (0, ctypes.sizeof(cls))
        for name, _ in cls._fields_:
            f = getattr(cls, name)
            out[f"{cls.__name__}.{name}"] = (f.offset, f.size)
    out.update({f"kind.{k}": (v, 0) for k, v in OP_KINDS.items()})
    out.update({f"gmbi_mode.{k}": (v, 0) for k, v in GMBI_MODES.items()})
    out.update({f"flag.{k}": (v, 0) for k, v in EK_FLAGS.items()})
    return out


def parse_layout(text: str) -> Dict[str, Tuple[int, int]]:
    out = {}
    for entry in filter(None, text.split(";")):
        name, a, b = entry.rsplit(":", 2)
        out[name] = (int(a), int(b))
    return out


def layout_mismatch(library: Dict[str, Tuple[int, int]], ours: Dict[str, Tuple[int, int]]) -> Optional[str]:
    """None when the two layouts agree, else what differs (named entries, the first few)."""
    bad = []
    for name in [*ours, *(k for k in library if k not in ours)]:
        if library.get(name) == ours.get(name):
            continue
        if name not in library:
            bad.append(f"{name} missing from the library")
        elif name not in ours:
            bad.append(f"{name} in the library only")
        elif "." not in name:  # a struct's size
            bad.append(f"{name} is {library[name][1]} bytes in the library, {ours[name][1]} here")
        elif name.startswith(("kind.", "gmbi_mode.")):
            bad.append(f"{name} is {library[name][0]} in the library, {ours[name][0]} here")
        else:
            (lo, ls), (oo, os_) = library[name], ours[name]
            bad.append(f"{name} at offset {lo} ({ls} bytes) in the library, {oo} ({os_} bytes) here")
    if not bad:
        return None
    return "; ".join(bad[:4]) + (f"; and {len(bad) - 4} more" if len(bad) > 4 else "")


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
        # the op structs, field by field: a library built from another struct layout would misread every op
        layout = getattr(lib, "ek_op_layout", None)
        if layout is None:
            raise EdgekitError(f"cpu-fused: {library} does not report its op struct layout (no ek_op_layout)")
        layout.restype, layout.argtypes = ctypes.c_char_p, []
        lib_layout = parse_layout(layout().decode())
        if "EkOp.pad" in lib_layout and not any(k.startswith("flag.") for k in lib_layout):
            # a library from before fp16 storage: the same word, named pad, which it never reads; no flag is ever
            # set for it (its half_storage_flags is 0)
            lib_layout["EkOp.flags"] = lib_layout.pop("EkOp.pad")
            lib_layout.update({f"flag.{k}": (v, 0) for k, v in EK_FLAGS.items()})
        mismatch = layout_mismatch(lib_layout, op_layout())
        if mismatch:
            raise EdgekitError(f"cpu-fused: {library} was built with other op structs than this edgekit's "
                               f"(refused): {mismatch}")
        halos = (ctypes.c_int * 3)()
        lib.ek_gmbi_halos(halos)
        if tuple(halos) != (HALO_R1, HALO_R2, HALO_R3):  # one design: the GPU kernel's halo arithmetic
            raise EdgekitError(f"cpu-fused: {library} uses GMBI halos {tuple(halos)}, the planner {(HALO_R1, HALO_R2, HALO_R3)}")
        self.lib = lib
        # whether the GMBI 1x1 runs bf16 on AMX (an avx512amx library the OS granted the tile state); older
        # libraries lack the symbol: fp32
        amx = getattr(lib, "ek_amx_active", None)
        if amx is not None:
            amx.restype, amx.argtypes = ctypes.c_int, []
        self.amx_active = bool(amx()) if amx is not None else False
        # the stem's count of non-finite input values (the runner's finite check); older libraries lack it
        take = getattr(lib, "ek_take_nonfinite_inputs", None)
        if take is not None:
            take.restype, take.argtypes = ctypes.c_longlong, [ctypes.c_void_p]
        self._take_nonfinite = take
        # the EkOp.flags it honours (fp16 storage of the stem's output, avx512amx); older libraries lack it: none
        half = getattr(lib, "ek_half_storage_flags", None)
        if half is not None:
            half.restype, half.argtypes = ctypes.c_int, []
        self.half_storage_flags = int(half()) if half is not None else 0
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

    def twin(self, threads: int = 1) -> "CpuKernels":
        """Another pool of ``threads`` on the same loaded (and already checked) library: its own scratch, two-phase
        z and AMX weight packs, so two twins can run programs at the same time from two OS threads (``ek_run``
        releases the GIL).  A 1-thread pool starts no worker thread: its tasks run inline on the caller."""
        other = object.__new__(CpuKernels)
        other.lib, other.amx_active, other.isa = self.lib, self.amx_active, self.isa
        other._take_nonfinite = self._take_nonfinite  # each pool keeps its own count
        other.half_storage_flags = self.half_storage_flags
        other.vector_width, other.threads = self.vector_width, max(1, int(threads))
        other._pool = self.lib.ek_pool_create(other.threads)
        return other

    def run(self, ops, timings: Optional[np.ndarray] = None, cpu_clock: bool = False) -> None:
        """Run a program; ``timings`` (float64, one per op) accumulates each op's milliseconds: wall time,
        or with ``cpu_clock`` the calling thread's CPU time (preemption-free, for 1-thread profiles)."""
        ms = timings.ctypes.data_as(ctypes.POINTER(ctypes.c_double)) if timings is not None else None
        rc = self.lib.ek_run(self._pool, ops, len(ops), ms, int(cpu_clock))
        if rc != 0:
            raise EdgekitError(f"cpu-fused: op {-rc - 1} of the program is invalid")

    @property
    def counts_nonfinite(self) -> bool:
        """Whether the library's stem counts the non-finite values (NaN, +-inf) of its input."""
        return self._take_nonfinite is not None

    def take_nonfinite(self) -> int:
        """The non-finite input values the stem ops read since the last call (each counted once); zeroes the count."""
        return int(self._take_nonfinite(self._pool))

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


GMBI_MODES = {"banded": 0, "two-phase": 1}  # EkGmbiOp.mode, as in gmbinet_cpu.cpp
GMBI_TWO_PHASE_MAX_ROWS = 64


def gmbi_mode(rows: int) -> str:
    """How a GMBI module of ``rows`` image rows is cut into tasks.  banded: a task = a band of rows through
    the whole module, its halo (up to 10 rows either side) recomputed; two-phase: the chain per (image,
    lane) over the whole image, then the 1x1 per band.  A band's halo is a fixed 2 x 10 rows, so it is the
    small images (stages 3-5 at 512 px) where it costs more than two-phase's z round trip through memory;
    the 64-row threshold is measured at batch 1 (kernels/README.md), and kept at larger batches, where
    two-phase still balances better (lanes x images tasks)."""
    return "two-phase" if rows <= GMBI_TWO_PHASE_MAX_ROWS else "banded"


def _set(struct: ctypes.Structure, args: Dict[str, object], names: str) -> None:
    for name in names.split():
        ftype = dict(struct._fields_)[name]
        setattr(struct, name, float(args[name]) if ftype is _F else int(args[name]))


def _fill(op: EkOp, kind: str, n: int, args: Dict[str, object], threads: int, panel_bytes: int) -> None:
    """One op from a launch's named arguments (``Launch.named``); the GPU's tiling arguments are not read."""
    op.kind, op.n = OP_KINDS[kind], n
    a = op.args
    if kind == "stem":
        _set(a, args, "x w b out cin cout H W h1 w1")
        op.band = band_rows(kind, n, a.h1, a.w1, a.cin * 9, threads, panel_bytes)
    elif kind in ("s2", "pw", "up"):
        _set(a, args, "x high dw_w dw_b pw_wt pw_b out cin cout ho wo hi wi hh wh sh sw")
        op.band = band_rows(kind, n, a.ho, a.wo, a.cin, threads, panel_bytes)
    elif kind == "gmbi":
        _set(a, args, "x dw_w dw_b pw_wt pw_b out C H W")
        mode = gmbi_mode(a.H)
        a.mode = GMBI_MODES[mode]
        # two-phase: the bands are only the 1x1's (halo 0), sized like any other layer's
        op.band = band_rows("gmbi" if mode == "banded" else "pw", n, a.H, a.W, a.C, threads, panel_bytes)
    elif kind == "head":
        _set(a, args, "x w b out cin cout h1 w1 H W sh sw")
        op.band = band_rows(kind, n, a.h1, a.w1, a.cin, threads, panel_bytes)
    else:  # pragma: no cover - the planner emits only these
        raise EdgekitError(f"cpu-fused: no CPU kernel for launch kind {kind!r}")


def build_program(plan: NetPlan, param_offsets: Dict[str, Tuple[int, int]], param_base: int, act_base: int,
                  threads: int, panel_bytes: int = PANEL_BYTES, fuse_head: bool = True):
    """(ctypes array of ``EkOp``, [the plan layers each op runs]): the plan's launches in order, each op's typed
    struct filled by argument name from the launch (resolved pointers, shapes), and CPU bands in place of CUDA
    grids.

    ``fuse_head``: DF1 and the head become one op (DF1's output never leaves the band's scratch; the
    plan's ``d1`` buffer is then left unwritten)."""
    resolved = plan.resolve(param_offsets, param_base, act_base)
    program: List[Tuple[EkOp, List[str]]] = []
    k = 0
    while k < len(resolved):
        ln, vals = resolved[k]
        args = ln.named(vals)
        op = EkOp()
        nxt = resolved[k + 1][0] if k + 1 < len(resolved) else None
        if (fuse_head and ln.kind == "up" and nxt is not None and nxt.kind == "head"
                and nxt.args[0] == ln.args[2]):  # the head reads exactly this DF's output
            head = nxt.named(resolved[k + 1][1])
            _fill(op, "up", plan.n, args, threads, panel_bytes)
            up = EkDwpwOp.from_buffer_copy(op.u.dwpw)
            op.kind = OP_KINDS["up+head"]
            fused = op.u.up_head
            fused.up = up
            fused.up.out = int(head["out"])  # the probability map; DF1's own output stays in scratch
            fused.head_w, fused.head_b, fused.head_cout = int(head["w"]), int(head["b"]), int(head["cout"])
            fused.H, fused.W = int(head["H"]), int(head["W"])
            fused.head_sh, fused.head_sw = float(head["sh"]), float(head["sw"])
            program.append((op, [ln.layer, nxt.layer]))
            k += 2
            continue
        _fill(op, ln.kind, plan.n, args, threads, panel_bytes)
        if ln.kind == "gmbi" and f"{ln.layer}.pw_q" in param_offsets:  # the INT8 1x1 (quantize_gmbi_1x1)
            g = op.u.gmbi
            g.pw_q = param_base + param_offsets[f"{ln.layer}.pw_q"][0]
            g.pw_qscale = param_base + param_offsets[f"{ln.layer}.pw_qscale"][0]
            g.pw_qinv = ctypes.c_float.from_address(param_base + param_offsets[f"{ln.layer}.pw_qinv"][0]).value
        program.append((op, [ln.layer]))
        k += 1
    ops = (EkOp * len(program))(*[op for op, _ in program])
    return ops, [layers for _, layers in program]


# ek_half_storage_flags's capability bit (not an EkOp flag): stage 2's buffers too (OUT_HALF on an S2 op, both
# flags on a banded GMBI module with the AMX 1x1)
HALF_GMBI = 4


def half_storage(plan: NetPlan, ops, act_base: int, flags: int) -> List[str]:
    """Store activation buffers as fp16 where the library converts (``flags``: its ``half_storage_flags``): e1 (the
    stem's output, read by down2 and DF1) and, where the library can (``HALF_GMBI``), stage 2's ping-pong buffers
    (written by down2 and the banded GMBI modules, read by those modules, down3 and DF2).  A buffer goes fp16 only
    where every op that touches it has the fp16 path for that pointer (stem out; S2 x and out; UP x; a banded
    GMBI module's x and out together); sets EkOp.flags and returns the buffers' names.  The arithmetic is
    unchanged: a value is rounded to fp16 once when stored and widened exactly when read."""
    need = EK_FLAGS["x_half"] | EK_FLAGS["out_half"]
    if flags & need != need:
        return []
    X, O = EK_FLAGS["x_half"], EK_FLAGS["out_half"]
    gmbi = bool(flags & HALF_GMBI)
    # (kind, pointer path) -> the flag that makes the kernel read / write that pointer as fp16
    paths = {(OP_KINDS["stem"], ("out",)): O, (OP_KINDS["s2"], ("x",)): X, (OP_KINDS["s2"], ("high",)): X,
             (OP_KINDS["up"], ("x",)): X, (OP_KINDS["up+head"], ("up", "x")): X}
    if gmbi:
        paths.update({(OP_KINDS["s2"], ("out",)): O, (OP_KINDS["gmbi"], ("x",)): X, (OP_KINDS["gmbi"], ("out",)): O})
    addr = {act_base + b.offset: name for name, b in plan.buffers.items() if name not in (plan.input, plan.output)}
    touches = {name: [] for name in addr.values()}  # name -> [(op index, flag)]; None: a pointer with no fp16 path
    for k, op in enumerate(ops):
        for path, a in pointer_fields(op.args):
            if a in addr:
                ok = paths.get((op.kind, path))
                if op.kind == OP_KINDS["gmbi"] and (op.args.mode != GMBI_MODES["banded"] or op.args.pw_q):
                    ok = None
                touches[addr[a]].append((k, ok))
    half = {n for n, t in touches.items() if t and all(f is not None for _, f in t)}
    while True:  # a GMBI module needs both its buffers fp16 or neither
        drop = set()
        for op in ops:
            if op.kind == OP_KINDS["gmbi"]:
                pair = {addr.get(op.args.x), addr.get(op.args.out)}
                if not pair <= half:
                    drop |= pair & half
        if not drop:
            break
        half -= drop
    for name in sorted(half):
        for k, f in touches[name]:
            ops[k].flags |= f
    return sorted(half, key=lambda n: plan.buffers[n].offset)


def pointer_fields(struct: ctypes.Structure, path: Tuple[str, ...] = ()) -> List[Tuple[Tuple[str, ...], int]]:
    """[(field path, address)] of every pointer of a typed op struct, nested structs included."""
    out = []
    for name, ftype in struct._fields_:
        if ftype is _P:
            out.append(((*path, name), getattr(struct, name) or 0))
        elif isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            out += pointer_fields(getattr(struct, name), (*path, name))
    return out


def _set_path(struct: ctypes.Structure, path: Tuple[str, ...], value: int) -> None:
    for name in path[:-1]:
        struct = getattr(struct, name)
    setattr(struct, path[-1], value)


def _aligned(nbytes: int, align: int = 64) -> np.ndarray:
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes]


# How a batch of N >= 2 images runs (FusedNet.batch_path; benchmarks/RESULTS.md 14.4 measured the choice):
#   "stream" (the default): whole rounds of T images (T = the pool's threads) run image-parallel, each of T OS
#       threads taking the next image through a 1-thread program on its own pool and activation arena (no
#       barrier between kernels, one image's activations stay in its core's cache); the N mod T images left
#       go one by one through the T-thread batch-1 program.  At T = 1 that is every image through the batch-1
#       program.  Every image's output is bit-identical to running it alone (tests/test_cpu_fused_batch.py).
#   "serial": every image through the T-thread batch-1 program (measured, not the default).
#   "whole": one program over the whole batch, each kernel a pass over all N images (the path before 14.4).
# Measured on the 2-core Xeon (AVX-512 + AMX), per call against "whole": stream 1.43x (bf16) / 1.37x (fp32) at
# batch 8 on 2 threads, 1.50x / 1.42x on 1 thread, 1.12-1.27x at batch 2 and 4; serial 1.07-1.30x; at batch 3
# (one round and a tail) stream and serial are equal within noise.  Whole rounds gain from lanes because a
# 1-thread program has no barrier between kernels and its image stays in its core's L2 (whole: 8 images'
# activations leave it between kernels); the tail goes to all T threads because one lane would leave T - 1 idle.
BATCH_PATHS = ("stream", "serial", "whole")


class _LaneThreads:
    """The OS threads that run lanes 1.. of a streamed batch: one daemon thread per lane, each taking calls from
    its own queue.  Not a concurrent.futures pool, which refuses every submit once the interpreter has begun to
    exit (a non-daemon thread still serving then got RuntimeError) and whose threads a fork's child does not
    have (the child's first streamed batch waited forever): these belong to the process that made them
    (``pid``), and ``FusedNet`` makes new ones in a child."""

    def __init__(self, count: int):
        import queue

        self.pid = os.getpid()
        self.queues = [queue.SimpleQueue() for _ in range(count)]
        self.threads = [threading.Thread(target=self._serve, args=(q,), name=f"edgekit-cpu-lane-{k + 1}", daemon=True)
                        for k, q in enumerate(self.queues)]
        for t in self.threads:
            t.start()

    @staticmethod
    def _serve(calls) -> None:
        while True:
            call = calls.get()
            if call is None:
                return
            fn, done, errors = call
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller, raised there
                errors.append(e)
            finally:
                done.set()

    def run(self, fns) -> list:
        """Start ``fns[k]`` on thread k; returns one (done event, errors) per call for ``wait``."""
        pending = []
        for q, fn in zip(self.queues, fns):
            done, errors = threading.Event(), []
            q.put((fn, done, errors))
            pending.append((done, errors))
        return pending

    @staticmethod
    def wait(pending) -> None:
        """Wait until every call has returned, even through a KeyboardInterrupt (or any exception a signal
        handler raises) meanwhile: a lane still running after ``forward`` returned would write into an output
        nobody reads and, on the next call, share its arena with another thread.  Then raise the first error."""
        interrupted = None
        for done, _ in pending:
            while True:
                try:
                    done.wait()
                    break
                except BaseException as e:  # noqa: BLE001 - re-raised below, once every lane is done
                    interrupted = interrupted or e
        if interrupted is not None:
            raise interrupted
        for _, errors in pending:
            if errors:
                raise errors[0]

    def stop(self, join: bool = True) -> None:
        if self.pid != os.getpid():
            return  # a fork's child: these threads exist only in the parent
        for q in self.queues:
            q.put(None)
        for t in self.threads if join else ():
            if t is not threading.current_thread():
                t.join()

    def __del__(self):
        # a network dropped without close(): its threads hold only their queues, so they end here (else one
        # idle thread per lane per network would stay for the life of the process)
        try:
            self.stop(join=False)
        except Exception:  # noqa: BLE001 - at interpreter exit the queues may already be gone
            pass


class FusedNet:
    """The whole network on the CPU kernels: folded parameters (one blob) + a program per batch size."""

    def __init__(self, kernels: CpuKernels, net: FoldedGMBINet, blob: np.ndarray,
                 offsets: Dict[str, Tuple[int, int]], panel_bytes: int = PANEL_BYTES, fuse_head: bool = True,
                 batch_path: str = "stream"):
        if batch_path not in BATCH_PATHS:
            raise EdgekitError(f"cpu-fused: batch_path {batch_path!r} is not one of {', '.join(BATCH_PATHS)}")
        self.kernels, self.net, self.offsets, self.panel_bytes = kernels, net, offsets, panel_bytes
        self.fuse_head, self.batch_path = fuse_head, batch_path
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
        # the image-parallel lanes, made on the first batch that uses them (a batch-1 station never pays for
        # them): {(H, W): [(1-thread kernels, state, io)] x T}, and T - 1 threads to run lanes 1.. on
        self._lanes: Dict[Tuple[int, int], list] = {}
        self._lane_threads = None
        self._closed = False
        self._lock = threading.Lock()

    def _build(self, n: int, height: int, width: int, threads: int, acts: Optional[np.ndarray] = None):
        """(state, io) of a program for ``n`` images cut into bands for ``threads``: state = (plan, arena, ops,
        layers); io = {buffer: [(op index, field path)]} where the program reads the input / writes the output.
        ``acts``: the arena of another program of the same plan (same n, height, width) that never runs at the
        same time as this one, else a new one."""
        plan = plan_gmbinet(self.net, n, height, width, "float32", channel_multiple=1)
        if acts is None:
            acts = _aligned(plan.act_bytes)
        elif acts.nbytes != plan.act_bytes:  # pragma: no cover - one plan, one layout
            raise EdgekitError("cpu-fused: a shared arena of another plan")
        ops, layers = build_program(plan, self.offsets, self.params.ctypes.data, acts.ctypes.data,
                                    threads, self.panel_bytes, self.fuse_head)
        # the plan says which buffers are fp16 (views and tests read them as what they are)
        for name in half_storage(plan, ops, acts.ctypes.data, self.kernels.half_storage_flags):
            b = plan.buffers[name]
            plan.buffers[name] = dataclasses.replace(b, dtype="float16", nbytes=b.nbytes // 2)
        # NaN in every buffer the program works in: one a kernel forgot to write shows up in the output.  The
        # input and output buffers (forward() points the program at the caller's arrays instead) and DF1's
        # output under the fused head are never touched, so their pages never become resident (8 MB at 512 px)
        used = {a for op in ops for _, a in pointer_fields(op.args)}
        for name, b in plan.buffers.items():
            if name not in (plan.input, plan.output) and acts.ctypes.data + b.offset in used:
                acts[b.offset:b.offset + b.nbytes] = 0xFF
        # where the program reads the input and writes the output: forward() points those at the
        # caller's batch and a fresh result array (no copies of 3 MB in and 1 MB out per 512x512 image)
        io = {plan.input: [], plan.output: []}
        for name, slots in io.items():
            addr = acts.ctypes.data + plan.buffers[name].offset
            slots += [(k, path) for k, op in enumerate(ops) for path, a in pointer_fields(op.args) if a == addr]
        return (plan, acts, ops, layers), io

    def state(self, n: int, height: int, width: int):
        key = (n, height, width)
        if key not in self._states:
            self._states[key], self._io[key] = self._build(n, height, width, self.kernels.threads)
        return self._states[key]

    def _point(self, key, name: str, addr: int) -> None:
        _point_io(self._states[key][2], self._io[key][name], addr)

    def view(self, plan: NetPlan, acts: np.ndarray, name: str) -> np.ndarray:
        b = plan.buffers[name]
        return acts[b.offset:b.offset + b.nbytes].view(np.dtype(b.dtype)).reshape(b.shape)

    def forward(self, x: np.ndarray, *, poison: bool = False, timings: Optional[np.ndarray] = None,
                cpu_clock: bool = False, buffers: bool = False, count_nonfinite: bool = False):
        """Probabilities ``N x out x H x W`` for a float32 NCHW batch (``buffers``: every buffer, by name).
        A batch of N >= 2 runs by ``batch_path``; with ``timings`` or ``buffers`` (the per-op profile and the
        buffers of the planned program) always as one whole-batch program.

        ``count_nonfinite``: returns ``(probabilities, count)``, ``count`` the NaN/inf values of ``x`` as the stem
        counted them while reading it (read under the call's lock, so it is this call's; a streamed batch sums
        the main pool's and every lane's count), or None where nothing counted them (a library without the
        count, or a program whose input some other op reads)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self.net.in_channels:
            raise EdgekitError(f"cpu-fused: expected N x {self.net.in_channels} x H x W, got {x.shape}")
        with self._lock:  # one call at a time: the programs, their arenas and the worker pools are shared
            if self._closed or self.kernels._pool is None:
                raise EdgekitError("cpu-fused: this network was closed")
            streamed = x.shape[0] >= 2 and self.batch_path != "whole" and timings is None and not buffers

            def run():
                if streamed:
                    return self._forward_streamed(x, poison)
                return self._forward(x, poison, timings, cpu_clock, buffers)

            if not count_nonfinite:
                return run()
            # a streamed batch runs the batch-1 program (on the main pool and on the lanes' twins of it)
            key = (1 if streamed else x.shape[0], *x.shape[2:])
            plan, _, ops, _ = self.state(*key)
            readers = self._io[key][plan.input]
            counted = (self.kernels.counts_nonfinite and not buffers and bool(readers)
                       and all(ops[k].kind == OP_KINDS["stem"] for k, _ in readers))

            def pools():  # each pool counts what its own stem ops read; lanes are made by the first streamed batch
                return [self.kernels] + ([lane[0] for lane in self._lanes.get(tuple(x.shape[2:]), [])]
                                         if streamed else [])

            if counted:
                for k in pools():
                    k.take_nonfinite()  # zero what an earlier call's programs left
            out = run()
            return out, (sum(k.take_nonfinite() for k in pools()) if counted else None)

    def _forward(self, x, poison, timings, cpu_clock, buffers):
        key = (x.shape[0], *x.shape[2:])
        plan, acts, ops, _ = self.state(*key)
        if poison:
            acts.fill(0xFF)
        if buffers:  # every buffer, the input and output included, in the plan's own memory
            if not poison:
                acts.fill(0xFF)  # the buffers the program never writes read back as NaN, not as zeros
            for name in (plan.input, plan.output):
                self._point(key, name, acts.ctypes.data + plan.buffers[name].offset)
            self.view(plan, acts, plan.input)[...] = x
            self.kernels.run(ops, timings, cpu_clock)
            return {name: self.view(plan, acts, name).copy() for name in plan.buffers}
        out = np.empty(plan.buffers[plan.output].shape, dtype=np.float32)
        if poison:
            out.fill(np.nan)
        _run_at(self.kernels, self.state(*key), self._io[key], x.ctypes.data, out.ctypes.data, timings, cpu_clock)
        return out

    def lanes(self, height: int, width: int) -> list:
        """The image-parallel lanes for ``height x width`` images, made on first use: one per pool thread, each
        a 1-thread pool on the same library with its own batch-1 program (and arena, but for lane 0's)."""
        if (height, width) not in self._lanes:
            lanes = []
            for t in range(self.kernels.threads):
                kernels = self.kernels.twin(1)
                # lane 0 (the calling thread) shares the T-thread batch-1 program's arena: that program runs only
                # the batch's tail, after every lane is done (one arena, 16 MB at 512 x 512, less per batch)
                shared = self.state(1, height, width)[1] if t == 0 else None
                state, io = self._build(1, height, width, 1, acts=shared)
                lanes.append((kernels, state, io))
            self._lanes[(height, width)] = lanes
        if self._lane_threads is not None and self._lane_threads.pid != os.getpid():
            self._lane_threads = None  # made before a fork: the child has none of those threads
        if self._lane_threads is None and self.kernels.threads > 1:
            self._lane_threads = _LaneThreads(self.kernels.threads - 1)
        return self._lanes[(height, width)]

    def _forward_streamed(self, x: np.ndarray, poison: bool) -> np.ndarray:
        n, threads, (h, w) = x.shape[0], self.kernels.threads, x.shape[2:]
        single = self.state(1, h, w)
        single_io = self._io[(1, h, w)]
        plan = single[0]
        out = np.empty((n, *plan.buffers[plan.output].shape[1:]), dtype=np.float32)
        img_in, img_out = x[0].nbytes, out[0].nbytes
        if poison:
            out.fill(np.nan)
            single[1].fill(0xFF)
        parallel = (n // threads) * threads if self.batch_path == "stream" and threads > 1 else 0
        if parallel:
            lanes = self.lanes(h, w)
            if poison:
                for _, (_, acts, _, _), _ in lanes:
                    acts.fill(0xFF)
            claim = iter(range(parallel))  # each image claimed by exactly one lane (dynamic: a preempted lane
            claim_lock = threading.Lock()  # takes fewer images on a shared machine)

            def run_lane(lane):
                kernels, state, io = lane
                while True:
                    with claim_lock:
                        i = next(claim, None)
                    if i is None:
                        return
                    _run_at(kernels, state, io, x.ctypes.data + i * img_in, out.ctypes.data + i * img_out)

            others = self._lane_threads.run([lambda lane=lane: run_lane(lane) for lane in lanes[1:]])
            try:
                run_lane(lanes[0])
            finally:
                self._lane_threads.wait(others)  # every lane done (and its error raised) before the arrays can go
        for i in range(parallel, n):  # the rest (or every image), one by one on all threads
            _run_at(self.kernels, single, single_io, x.ctypes.data + i * img_in, out.ctypes.data + i * img_out)
        return out

    def close(self) -> None:
        """Stop the lanes' threads and free their pools and every arena; a later ``forward`` is refused.  The main
        pool is the caller's (``CpuKernels.close``, safe once this returned: no call can be running or start)."""
        with self._lock:
            self._closed = True
            if self._lane_threads is not None:
                self._lane_threads.stop()
                self._lane_threads = None
            for lanes in self._lanes.values():
                for kernels, _, _ in lanes:
                    kernels.close()
            self._lanes.clear()
            self._states.clear()
            self._io.clear()


def _point_io(ops, slots, addr: int) -> None:
    for k, path in slots:
        _set_path(ops[k].args, path, addr)


def _run_at(kernels: CpuKernels, state, io, x_addr: int, out_addr: int, timings=None, cpu_clock: bool = False):
    """Run a program with its input and output pointed at ``x_addr`` / ``out_addr``, then point them back at its
    own arena (never leave a program pointing at memory the caller may free)."""
    plan, acts, ops, _ = state
    _point_io(ops, io[plan.input], x_addr)
    _point_io(ops, io[plan.output], out_addr)
    try:
        kernels.run(ops, timings, cpu_clock)
    finally:
        _point_io(ops, io[plan.input], acts.ctypes.data + plan.buffers[plan.input].offset)
        _point_io(ops, io[plan.output], acts.ctypes.data + plan.buffers[plan.output].offset)


__all__ = ["BATCH_PATHS", "DEFAULT_ISAS", "EK_FLAGS", "half_storage", "ISA_LEVELS", "OPT_IN_ISAS", "OP_STRUCTS", "CpuKernels", "EkOp", "FusedNet", "op_layout", "band_rows", "build_program", "choose_isa",
           "cpu_description", "cpu_features", "source_path", "supported_isas"]
