"""Ahead-of-time build and compile check of the CUDA kernels (``edgekit/kernels/cuda/gmbi_fused.cu`` and
``edgekit/kernels/cuda/gmbinet_layers.cu``, the whole-network module).

    python -m edgekit.kernels.cuda.build                       # cubins for sm_87 sm_89 sm_90 -> edgekit/kernels/cuda/build
    python -m edgekit.kernels.cuda.build --format fatbin       # one fatbin (+ PTX of the newest arch)
    python -m edgekit.kernels.cuda.build --check --arch sm_90  # compile only, report, write nothing
    python -m edgekit.kernels.cuda.build --arch sm_87 --driver-cuda 12.6   # Jetson Orin, JetPack 6 (CUDA 12.x)

A driver loads PTX and cubins only from a toolkit no newer than itself: Orin kernels must be built
with the CUDA toolkit matching the board's driver (JetPack 6 = CUDA 12.x, not this machine's CUDA 13).
``--driver-cuda`` refuses a newer nvcc with one line; the manifest records nvcc's CUDA version and
the loader refuses artifacts newer than the driver it runs on.

Every build runs ``nvcc`` with ``-Xptxas -v``; the ptxas report is parsed into per-kernel
registers / shared memory / stack / spill bytes, and the build fails on compile errors, on missing
entry points and on register spills.  A ``manifest.json`` next to the artifacts records the SHA-256
of the source so the loader (``edgekit.kernels.cuda.gmbi.load_kernel_module``) never uses a stale binary.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from edgekit.errors import EdgekitError
from edgekit.kernels.cuda.gmbi import NVCC_FLAGS, kernel_build_dir, kernel_dir, kernel_source_path
from edgekit.kernels.cuda.gmbinet import LAYERS_SOURCE
from edgekit.kernels.cuda.module import find_nvcc, fmt_version, nvcc_cuda_version, parse_cuda_version, toolkit_driver_problem
from edgekit.kernels.graph import KERNEL_NAMES, NET_KERNEL_NAMES
from edgekit.kernels.sources import source_digest

# Every source compiled by default, with the entry points it must define.  gmbinet_layers.cu
# #includes gmbi_fused.cu, so its module holds every kernel of the whole network.
SOURCES = {"gmbi_fused.cu": tuple(KERNEL_NAMES.values()), LAYERS_SOURCE: NET_KERNEL_NAMES}

DEFAULT_ARCHS = ("sm_87", "sm_89", "sm_90")


@dataclass
class KernelResources:
    """One entry function's resource use for one architecture, from ``ptxas -v``."""

    kernel: str
    arch: str
    registers: int = 0
    barriers: int = 0
    smem_static: int = 0  # bytes of static shared memory (the kernel's is all dynamic)
    cmem: int = 0  # bytes of constant bank 0 (kernel parameters); absent from recent ptxas reports
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    source: str = ""  # the .cu file compiled

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


@dataclass
class BuildResult:
    archs: List[str]
    fmt: str
    artifacts: dict = field(default_factory=dict)  # source name -> {arch -> file name (inside out_dir)}
    resources: List[KernelResources] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    log: str = ""

    def table(self) -> str:
        rows = ["source             arch   kernel               regs  smem(static)  stack  spill st/ld  barriers"]
        for r in self.resources:
            rows.append(f"{r.source:<18} {r.arch:<6} {r.kernel:<20} {r.registers:>4}  {r.smem_static:>12}  "
                        f"{r.stack:>5}  "
                        f"{r.spill_stores:>5}/{r.spill_loads:<5}  {r.barriers:>8}")
        return "\n".join(rows)

    def files(self) -> List[str]:
        return sorted({f for per_arch in self.artifacts.values() for f in per_arch.values()})


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CMEM0 = re.compile(r"(\d+) bytes cmem\[0\]")


def parse_ptxas(text: str) -> List[KernelResources]:
    """Parse ``ptxas -v`` output (as printed through ``nvcc -Xptxas -v``) into one record per
    (entry function, arch).  Spills reported for non-inlined device functions are added to the
    entry function being compiled."""
    out: List[KernelResources] = []
    cur: Optional[KernelResources] = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = KernelResources(kernel=m.group(1), arch=m.group(2))
            out.append(cur)
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            stack, st, ld = (int(v) for v in m.groups())
            cur.stack = max(cur.stack, stack)
            cur.spill_stores += st
            cur.spill_loads += ld
            continue
        m = _USED.search(line)
        if m:
            cur.registers = int(m.group(1))
            if (b := _BARRIERS.search(line)):
                cur.barriers = int(b.group(1))
            if (s := _SMEM.search(line)):
                cur.smem_static = int(s.group(1))
            if (c := _CMEM0.search(line)):
                cur.cmem = int(c.group(1))
    return out


def _arch_num(arch: str) -> str:
    m = re.fullmatch(r"sm_(\d+[a-z]?)", arch)
    if not m:
        raise EdgekitError(f"bad CUDA architecture {arch!r}: expected e.g. sm_90")
    return m.group(1)


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True)
    except OSError as e:
        raise EdgekitError(f"cannot run {cmd[0]}: {e.strerror or e}") from None


def compile_kernels(archs: Iterable[str] = DEFAULT_ARCHS, fmt: str = "cubin", out_dir: Optional[Path] = None,
                    source: Optional[Path] = None, extra_flags: Sequence[str] = (),
                    allow_spills: bool = False, nvcc: Optional[str] = None,
                    driver_cuda: Optional[str] = None) -> BuildResult:
    """Compile the kernel sources (every file of ``SOURCES``, or just ``source``) with ``nvcc -cubin``
    (one file per source and arch) or ``-fatbin`` (one file per source, plus PTX of the newest arch
    for forward compatibility), with ``-Xptxas -v``.

    ``out_dir=None`` compiles into a temporary folder and keeps nothing (a compile check).  Raises
    ``EdgekitError`` when nvcc is missing or fails, an entry point is missing, (unless
    ``allow_spills``) any kernel spills registers, or ``driver_cuda`` (the CUDA version of the
    target's driver, e.g. ``12.6`` for a Jetson Orin on JetPack 6) is older than nvcc's toolkit: that
    driver could not load what this nvcc builds."""
    archs = list(dict.fromkeys(archs))
    if not archs:
        raise EdgekitError("no CUDA architecture given")
    nums = [_arch_num(a) for a in archs]
    if fmt not in ("cubin", "fatbin"):
        raise EdgekitError(f"unknown output format {fmt!r}: use cubin or fatbin")
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise EdgekitError("nvcc is not on PATH: install the CUDA toolkit to build the fused kernels")
    toolkit = nvcc_cuda_version(nvcc)
    if driver_cuda is not None:
        target = parse_cuda_version(str(driver_cuda))
        if target is None:
            raise EdgekitError(f"--driver-cuda {driver_cuda!r}: expected a CUDA version such as 12.6")
        if toolkit is None:
            raise EdgekitError(f"cannot tell the CUDA version of {nvcc} (nvcc --version) to compare with the "
                               f"target's driver CUDA {fmt_version(target)}")
        problem = toolkit_driver_problem(toolkit, target, f"nvcc ({nvcc}) is")
        if problem:
            raise EdgekitError(problem.replace("this driver's", "the target driver's"))
    if source is not None:
        sources = [Path(source)]
    else:
        kernel_source_path()  # a clear error when the kernel folder is missing
        sources = [kernel_dir() / name for name in SOURCES]
    base = [nvcc, *NVCC_FLAGS, "-Xptxas", "-v", *extra_flags]
    result = BuildResult(archs=archs, fmt=fmt)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        logs = []
        for src in sources:
            if not src.is_file():
                raise EdgekitError(f"kernel source not found: {src}")
            jobs = []
            if fmt == "cubin":
                for arch in archs:
                    name = f"{src.stem}.{arch}.cubin"
                    jobs.append(([*base, "-cubin", f"-arch={arch}", "-o", str(work / name), str(src)], {arch: name}))
            else:
                name = f"{src.stem}.fatbin"
                gencode = []
                for num in nums:
                    gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
                gencode += ["-gencode", f"arch=compute_{nums[-1]},code=compute_{nums[-1]}"]
                jobs.append(([*base, "-fatbin", *gencode, "-o", str(work / name), str(src)], {a: name for a in archs}))
            for cmd, produced in jobs:
                proc = _run(cmd)
                text = proc.stdout + proc.stderr
                logs.append("$ " + " ".join(cmd) + "\n" + text)
                if proc.returncode != 0:
                    files = " ".join(sorted(set(produced.values())))
                    raise EdgekitError(f"nvcc failed (rc {proc.returncode}) for {files}:\n{text.strip()[-4000:]}")
                found = parse_ptxas(text)
                for r in found:
                    r.source = src.name
                result.resources += found
                result.warnings += [ln for ln in text.splitlines() if "warning" in ln.lower()]
                result.artifacts.setdefault(src.name, {}).update(produced)
        result.log = "\n".join(logs)
        for src in sources:
            for arch in archs:
                for kernel in SOURCES.get(src.name, tuple(KERNEL_NAMES.values())):
                    if not any((r.source, r.arch, r.kernel) == (src.name, arch, kernel) for r in result.resources):
                        raise EdgekitError(f"ptxas reported no entry function {kernel} for {arch} in {src.name}:\n"
                                           f"{result.log[-4000:]}")
        spilled = [r for r in result.resources if r.spills]
        if spilled and not allow_spills:
            raise EdgekitError("register spills: " + ", ".join(
                f"{r.kernel}/{r.arch} ({r.source}) {r.spill_stores}B stores {r.spill_loads}B loads" for r in spilled))
        if out_dir is not None:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            for name in result.files():
                shutil.copy2(work / name, out_dir / name)
            nvcc_version = _run([nvcc, "--version"]).stdout.strip().splitlines()
            manifest = {
                "nvcc": nvcc_version[-1] if nvcc_version else "",
                # the driver loading these must support at least this CUDA version (checked at load)
                "cuda_version": fmt_version(toolkit) if toolkit else None,
                "flags": [*NVCC_FLAGS, *extra_flags],
                "format": fmt,
                # per source: SHA-256 over the file and the local files it #includes, and its artifacts
                "sources": {src.name: {"sha256": source_digest(src), "artifacts": result.artifacts[src.name]}
                            for src in sources},
                "resources": [asdict(r) for r in result.resources],
            }
            first = sources[0]  # the single-source keys older loaders read (gmbi_fused.cu by default)
            manifest.update({"source": first.name, "source_sha256": source_digest(first),
                             "artifacts": result.artifacts[first.name]})
            (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return result


EMULATOR_PROGRAMS = {"gmbi": "gmbi_emu_main.cpp", "gmbinet": "gmbinet_emu_main.cpp"}


def _cxx() -> Optional[str]:
    return shutil.which("g++") or shutil.which("clang++")


def _cuda_include() -> Optional[Path]:
    """The CUDA toolkit's include folder (for cuda_fp16.h), next to nvcc or under /usr/local/cuda."""
    nvcc = find_nvcc()
    candidates = [Path(nvcc).resolve().parent.parent / "include"] if nvcc else []
    candidates += [Path("/usr/local/cuda/include")]
    return next((c for c in candidates if (c / "cuda_fp16.h").is_file()), None)


def emulator_available() -> bool:
    """Whether :func:`build_emulator` can work here: a C++ compiler and the CUDA headers."""
    return _cxx() is not None and _cuda_include() is not None


def build_emulator(out: Path, sanitize: str = "address", compiler: Optional[str] = None,
                   cuda_include: Optional[Path] = None, program: str = "gmbi", opt: str = "-O1") -> Path:
    """Compile a host-emulation program with a C++20 compiler and the given sanitizer (``address`` =
    ASan + UBSan, ``thread`` = TSan, ``none``): ``program="gmbi"`` is ``edgekit/kernels/cuda/emu/gmbi_emu_main.cpp``
    (one fused GMBI launch), ``"gmbinet"`` is ``edgekit/kernels/cuda/emu/gmbinet_emu_main.cpp`` (a whole planned
    GMBINet launch sequence over every kernel of ``edgekit/kernels/cuda/gmbinet_layers.cu``)."""
    if program not in EMULATOR_PROGRAMS:
        raise EdgekitError(f"unknown emulator program {program!r}: {', '.join(EMULATOR_PROGRAMS)}")
    cxx = compiler or _cxx()
    if cxx is None:
        raise EdgekitError("no C++ compiler (g++ or clang++) on PATH for the kernel emulator")
    if cuda_include is None:
        cuda_include = _cuda_include()
        if cuda_include is None:
            raise EdgekitError("cuda_fp16.h not found: the kernel emulator needs the CUDA toolkit headers")
    flags = {"address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
             "thread": ["-fsanitize=thread"], "none": []}
    if sanitize not in flags:
        raise EdgekitError(f"unknown sanitizer {sanitize!r}")
    main = kernel_source_path().parent / "emu" / EMULATOR_PROGRAMS[program]
    cmd = [cxx, "-std=c++20", opt, "-g", "-fno-omit-frame-pointer", "-pthread", *flags[sanitize],
           f"-I{cuda_include}", str(main), "-o", str(out)]
    proc = _run(cmd)
    if proc.returncode != 0:
        raise EdgekitError(f"building the kernel emulator failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return Path(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgekit.kernels.cuda.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", help=f"target architecture, repeatable (default: {' '.join(DEFAULT_ARCHS)})")
    ap.add_argument("--format", choices=("cubin", "fatbin"), default="cubin")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: edgekit/kernels/cuda/build)")
    ap.add_argument("--check", action="store_true", help="compile and report only; write nothing")
    ap.add_argument("--allow-spills", action="store_true", help="report register spills instead of failing")
    ap.add_argument("--json", action="store_true", help="print the per-kernel resources as JSON")
    ap.add_argument("--driver-cuda", metavar="X.Y", default=None,
                    help="CUDA version of the target board's driver (nvidia-smi / JetPack: Orin on JetPack 6 = 12.x); "
                         "refuse to build with a newer nvcc, whose output that driver cannot load")
    args = ap.parse_args(argv)
    out = None if args.check else (args.out or kernel_build_dir())
    try:
        res = compile_kernels(args.arch or DEFAULT_ARCHS, fmt=args.format, out_dir=out, allow_spills=args.allow_spills,
                              driver_cuda=args.driver_cuda)
    except EdgekitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(r) for r in res.resources], indent=2))
    else:
        print(res.table())
        for w in res.warnings:
            print(w)
        print(f"wrote {', '.join(res.files())} to {out}" if out else "compile check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
