"""Ahead-of-time build and compile check of the fused GMBI kernel.

    python -m edgekit.kernels.build                       # cubins for sm_87 sm_89 sm_90 -> kernels/build
    python -m edgekit.kernels.build --format fatbin       # one fatbin (+ PTX of the newest arch)
    python -m edgekit.kernels.build --check --arch sm_90  # compile only, report, write nothing

Every build runs ``nvcc`` with ``-Xptxas -v``; the ptxas report is parsed into per-kernel
registers / shared memory / stack / spill bytes, and the build fails on compile errors, on missing
entry points and on register spills.  A ``manifest.json`` next to the artifacts records the SHA-256
of the source so the loader (``edgekit.kernels.gmbi.load_kernel_module``) never uses a stale binary.
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
from edgekit.kernels.gmbi import KERNEL_NAMES, NVCC_FLAGS, kernel_build_dir, kernel_source_path, source_sha256

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

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


@dataclass
class BuildResult:
    archs: List[str]
    fmt: str
    artifacts: dict = field(default_factory=dict)  # arch -> file name (inside out_dir)
    resources: List[KernelResources] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    log: str = ""

    def table(self) -> str:
        rows = ["arch   kernel            regs  smem(static)  stack  spill st/ld  barriers"]
        for r in self.resources:
            rows.append(f"{r.arch:<6} {r.kernel:<17} {r.registers:>4}  {r.smem_static:>12}  {r.stack:>5}  "
                        f"{r.spill_stores:>5}/{r.spill_loads:<5}  {r.barriers:>8}")
        return "\n".join(rows)


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


def find_nvcc() -> Optional[str]:
    return shutil.which("nvcc")


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
                    allow_spills: bool = False, nvcc: Optional[str] = None) -> BuildResult:
    """Compile the kernel with ``nvcc -cubin`` (one file per arch) or ``-fatbin`` (one file, plus PTX
    of the newest arch for forward compatibility), with ``-Xptxas -v``.

    ``out_dir=None`` compiles into a temporary folder and keeps nothing (a compile check).  Raises
    ``EdgekitError`` when nvcc is missing or fails, an entry point is missing, or (unless
    ``allow_spills``) any kernel spills registers."""
    archs = list(dict.fromkeys(archs))
    if not archs:
        raise EdgekitError("no CUDA architecture given")
    nums = [_arch_num(a) for a in archs]
    if fmt not in ("cubin", "fatbin"):
        raise EdgekitError(f"unknown output format {fmt!r}: use cubin or fatbin")
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise EdgekitError("nvcc is not on PATH: install the CUDA toolkit to build the fused kernels")
    source = Path(source) if source else kernel_source_path()
    base = [nvcc, *NVCC_FLAGS, "-Xptxas", "-v", *extra_flags]
    result = BuildResult(archs=archs, fmt=fmt)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        jobs = []
        if fmt == "cubin":
            for arch in archs:
                name = f"{source.stem}.{arch}.cubin"
                jobs.append(([*base, "-cubin", f"-arch={arch}", "-o", str(work / name), str(source)], {arch: name}))
        else:
            name = f"{source.stem}.fatbin"
            gencode = []
            for num in nums:
                gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
            gencode += ["-gencode", f"arch=compute_{nums[-1]},code=compute_{nums[-1]}"]
            jobs.append(([*base, "-fatbin", *gencode, "-o", str(work / name), str(source)], {a: name for a in archs}))
        logs = []
        for cmd, produced in jobs:
            proc = _run(cmd)
            text = proc.stdout + proc.stderr
            logs.append("$ " + " ".join(cmd) + "\n" + text)
            if proc.returncode != 0:
                raise EdgekitError(f"nvcc failed (rc {proc.returncode}) for {' '.join(produced)}:\n{text.strip()[-4000:]}")
            result.resources += parse_ptxas(text)
            result.warnings += [ln for ln in text.splitlines() if "warning" in ln.lower()]
            result.artifacts.update(produced)
        result.log = "\n".join(logs)
        for arch in archs:
            for kernel in KERNEL_NAMES.values():
                if not any(r.arch == arch and r.kernel == kernel for r in result.resources):
                    raise EdgekitError(f"ptxas reported no entry function {kernel} for {arch}:\n{result.log[-4000:]}")
        spilled = [r for r in result.resources if r.spills]
        if spilled and not allow_spills:
            raise EdgekitError("register spills: " + ", ".join(
                f"{r.kernel}/{r.arch} {r.spill_stores}B stores {r.spill_loads}B loads" for r in spilled))
        if out_dir is not None:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            for name in set(result.artifacts.values()):
                shutil.copy2(work / name, out_dir / name)
            nvcc_version = _run([nvcc, "--version"]).stdout.strip().splitlines()
            manifest = {
                "source": source.name,
                "source_sha256": source_sha256(source),
                "nvcc": nvcc_version[-1] if nvcc_version else "",
                "flags": [*NVCC_FLAGS, *extra_flags],
                "format": fmt,
                "artifacts": result.artifacts,
                "resources": [asdict(r) for r in result.resources],
            }
            (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return result


def build_emulator(out: Path, sanitize: str = "address", compiler: Optional[str] = None,
                   cuda_include: Optional[Path] = None) -> Path:
    """Compile ``kernels/emu/gmbi_emu_main.cpp`` (the kernel source under host emulation) with a C++20
    compiler and the given sanitizer (``address`` = ASan + UBSan, ``thread`` = TSan, ``none``)."""
    cxx = compiler or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise EdgekitError("no C++ compiler (g++ or clang++) on PATH for the kernel emulator")
    if cuda_include is None:
        nvcc = find_nvcc()
        candidates = [Path(nvcc).resolve().parent.parent / "include"] if nvcc else []
        candidates += [Path("/usr/local/cuda/include")]
        cuda_include = next((c for c in candidates if (c / "cuda_fp16.h").is_file()), None)
        if cuda_include is None:
            raise EdgekitError("cuda_fp16.h not found: the kernel emulator needs the CUDA toolkit headers")
    flags = {"address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
             "thread": ["-fsanitize=thread"], "none": []}
    if sanitize not in flags:
        raise EdgekitError(f"unknown sanitizer {sanitize!r}")
    main = kernel_source_path().parent / "emu" / "gmbi_emu_main.cpp"
    cmd = [cxx, "-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-pthread", *flags[sanitize],
           f"-I{cuda_include}", str(main), "-o", str(out)]
    proc = _run(cmd)
    if proc.returncode != 0:
        raise EdgekitError(f"building the kernel emulator failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return Path(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgekit.kernels.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", help=f"target architecture, repeatable (default: {' '.join(DEFAULT_ARCHS)})")
    ap.add_argument("--format", choices=("cubin", "fatbin"), default="cubin")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: kernels/build)")
    ap.add_argument("--check", action="store_true", help="compile and report only; write nothing")
    ap.add_argument("--allow-spills", action="store_true", help="report register spills instead of failing")
    ap.add_argument("--json", action="store_true", help="print the per-kernel resources as JSON")
    args = ap.parse_args(argv)
    out = None if args.check else (args.out or kernel_build_dir())
    try:
        res = compile_kernels(args.arch or DEFAULT_ARCHS, fmt=args.format, out_dir=out, allow_spills=args.allow_spills)
    except EdgekitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(r) for r in res.resources], indent=2))
    else:
        print(res.table())
        for w in res.warnings:
            print(w)
        print(f"wrote {', '.join(sorted(set(res.artifacts.values())))} to {out}" if out else "compile check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
