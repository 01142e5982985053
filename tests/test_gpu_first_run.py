"""What a review of the GPU code found would break or mislead the first run on a GPU (issue 15,
part 1), each checked here without a GPU: on the fake PyCUDA of ``test_cuda_fused`` (device memory
is numpy, launches run through the whole-network host emulator), a fake libcuda for the graph
capture, a stand-in ``nvcc --version``, and the wheel setup.py builds."""
from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_emulator
from edgekit.errors import EdgekitError
from edgekit.kernels.cuda import build as kbuild
from edgekit.kernels.cuda import gmbinet as CG
from edgekit.kernels.cuda import module as cuda_module
from conftest import random_gmbinet
from test_cuda_fused import SMALL, _FakeNetCuda

ROOT = Path(__file__).resolve().parents[1]
INPUT = (21, 26)


@pytest.fixture()
def small_ckpt(tmp_path):
    from edgekit.data.preprocess import PreprocessSpec
    from edgekit.models.checkpoint import Checkpoint

    ck = Checkpoint.from_model(random_gmbinet(SMALL, seed=11), preprocess=PreprocessSpec(input_size=INPUT))
    return ck.save(tmp_path / "small.pt")


def install_fake(monkeypatch, tmp_path, emulator=None, nvcc="nvcc", **kw) -> _FakeNetCuda:
    """The fake PyCUDA in sys.modules, no prebuilt kernels, ``nvcc`` as what PATH finds (None: absent)."""
    fake = _FakeNetCuda(emulator, tmp_path, **kw)
    for name, mod in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(cuda_module, "_MODULES", {})
    monkeypatch.setenv("EDGEKIT_KERNEL_BUILD_DIR", str(tmp_path / "no-build"))
    monkeypatch.setattr(cuda_module, "find_nvcc", lambda: nvcc)
    return fake


class HostTiming:
    """bench's timing seam on the CPU: host inputs, wall-clock per call. ``broken()`` says the (fake)
    CUDA context is poisoned: then every synchronisation fails, as torch's would after a kernel fault."""

    def __init__(self, broken=lambda: False):
        self.broken = broken

    def inputs(self, shape, batches):
        rng = np.random.default_rng(0)
        return {b: None for b in batches}, {b: rng.standard_normal((b, *shape)).astype(np.float32) for b in batches}

    def synchronize(self):
        if self.broken():
            raise RuntimeError("CUDA error: unspecified launch failure\nCUDA kernel errors might be reported ...")

    def measure(self, call):
        t = time.perf_counter()
        call()
        self.synchronize()
        return time.perf_counter() - t


def torch_rows_on_cpu(row, **kw):
    """The bench opener with PyTorch rows on the CPU (no CUDA here); other rows open as in bench."""
    from edgekit import runtime
    from edgekit.bench.gpu import open_row

    return runtime.load(row.path) if row.kind == "torch" else open_row(row, **kw)


def bench(ckpt, specs, timing, logs, rounds=1):
    from edgekit.bench.gpu import plan_gpu_rows, run_gpu_bench

    planned, skipped = plan_gpu_rows([str(ckpt)], specs, available={"cuda-fused": True, "trt": False})
    return run_gpu_bench(planned, data="synthetic:2", batches=(1, 2), rounds=rounds, iters=2, warmup=1, eval_limit=2,
                         skipped=skipped, show_progress=False, log=logs.append, timing=timing,
                         opener=torch_rows_on_cpu)


# ------------------------------------------------------------------------------------ bench --device gpu


@pytest.mark.parametrize("failure", ["compile-error", "no-nvcc", "logic-error"])
def test_bench_backend_errors_become_failed_rows(small_ckpt, tmp_path, monkeypatch, failure):
    """A PyCUDA CompileError (nvcc's multi-line log), nvcc missing, or a raw PyCUDA LogicError while the
    runner uploads its parameters: the fused rows fail with one line each, the PyTorch row is still
    measured, and the table lists the failures."""
    from edgekit.bench.gpu import TABLE_COLUMNS, table_rows

    fake = install_fake(monkeypatch, tmp_path, nvcc=None if failure == "no-nvcc" else "nvcc")
    compile_error = type("CompileError", (Exception,), {})

    def failing_compile(source, **kw):
        raise compile_error("nvcc compilation of /tmp/kernel.cu failed\n[command: nvcc --cubin ...]\n[stderr: ...]")

    fake.modules["pycuda.compiler"].compile = failing_compile
    if failure == "logic-error":
        fake.modules["pycuda.compiler"].compile = lambda source, **kw: b"cubin"
        logic_error = type("LogicError", (Exception,), {})

        def to_device(a):
            raise logic_error("cuMemAlloc failed: out of memory")

        fake.modules["pycuda.driver"].to_device = to_device
    logs = []
    result = bench(small_ckpt, ["eager:fp32", "cuda-fused:fp32", "cuda-fused:fp16"], HostTiming(), logs)
    assert [r["name"] for r in result["rows"]] == ["eager:fp32"]
    assert result["rows"][0]["fps_b1"] > 0 and result["rows"][0]["timing_phase"] == 1
    failed = {f["name"]: f for f in result["failed"]}
    assert set(failed) == {"cuda-fused:fp32", "cuda-fused:fp16"}
    for f in failed.values():
        assert f["stage"] == "load" and "\n" not in f["reason"]
        expected = {"compile-error": "CompileError: nvcc compilation", "no-nvcc": "nvcc is not on PATH",
                    "logic-error": "LogicError: cuMemAlloc failed: out of memory"}[failure]
        assert expected in f["reason"], f["reason"]
    table = table_rows(result)
    assert all(len(r) == len(TABLE_COLUMNS) for r in table)
    assert sum("FAILED at load" in r[0] for r in table) == 2


@needs_emulator
def test_bench_kernel_fault_keeps_the_baseline_rows(small_ckpt, tmp_path, monkeypatch):
    """A launch failure in the fused row (here at its batch-2 arena) poisons the context: the fused row
    fails with the LaunchError, and the PyTorch row keeps the times it got before any of our kernels
    was loaded (phase 1)."""
    exe = kbuild.build_emulator(tmp_path / "gmbinet_emu", sanitize="none", program="gmbinet", opt="-O1")
    fake = install_fake(monkeypatch, tmp_path, emulator=exe)
    launch_error = type("LaunchError", (Exception,), {})
    state = {"arenas": 0, "poisoned": False}
    drv = fake.modules["pycuda.driver"]
    real_alloc, real_flush = drv.mem_alloc, fake.flush

    def mem_alloc(n):
        state["arenas"] += 1
        state["poisoned"] = state["arenas"] > 1  # the first arena (batch 1) is fine, the second one faults
        return real_alloc(n)

    def flush():
        if state["poisoned"]:
            fake.queue.clear()
            raise launch_error("cuCtxSynchronize failed: unspecified launch failure")
        real_flush()

    drv.mem_alloc, fake.flush = mem_alloc, flush
    logs = []
    result = bench(small_ckpt, ["eager:fp32", "cuda-fused:fp32"], HostTiming(lambda: state["poisoned"]), logs,
                   rounds=2)
    assert [(r["name"], r["timing_phase"]) for r in result["rows"]] == [("eager:fp32", 1)]
    assert result["rows"][0]["latency_ms"]["samples"] == 2 * 2  # rounds x iters of phase 1
    (f,) = result["failed"]
    assert f["name"] == "cuda-fused:fp32" and f["stage"] == "timing" and "LaunchError: cuCtxSynchronize" in f["reason"]
    assert any("keeping its phase-1 times" in line for line in logs)


def test_open_row_does_not_retry_without_the_precision(monkeypatch, small_ckpt):
    """A TypeError from the fused loader is that row's failure, not a reason to load fp16 under an
    fp32 label."""
    import dataclasses

    from edgekit.backends import registry
    from edgekit.bench.gpu import PlannedRow, open_row

    calls = []

    def load(path, **kw):
        calls.append(kw)
        raise TypeError("unexpected keyword argument 'precision'")

    spec = registry.get_backend("cuda-fused")
    monkeypatch.setitem(registry._SPECS, "cuda-fused", dataclasses.replace(spec, load=load))
    with pytest.raises(TypeError):
        open_row(PlannedRow("cuda-fused:fp32", "cuda-fused", "fp32", small_ckpt), max_autotune=False, calib=None,
                 log=print)
    assert calls == [{"precision": "fp32"}]


# ------------------------------------------------------------------------------------ loading the kernels


def test_load_without_nvcc_says_so_in_one_line(small_ckpt, tmp_path, monkeypatch):
    from edgekit.backends.cuda_fused.runner import load_cuda_fused

    fake = install_fake(monkeypatch, tmp_path, nvcc=None)
    with pytest.raises(EdgekitError, match="nvcc is not on PATH") as e:
        load_cuda_fused(small_ckpt, precision="fp32")
    assert "\n" not in str(e.value) and "sm_87" in str(e.value)
    assert not [c for c in fake.calls if c[0] == "compile"]


def _prebuilt(folder: Path, cuda_version: str) -> Path:
    import json

    folder.mkdir()
    (folder / "gmbinet_layers.fatbin").write_bytes(b"\0")
    entry = {"sha256": cuda_module.source_digest(CG.layers_source_path()), "artifacts": {"sm_87": "gmbinet_layers.fatbin"}}
    (folder / "manifest.json").write_text(json.dumps({"sources": {CG.LAYERS_SOURCE: entry}, "cuda_version": cuda_version}))
    return folder


@pytest.mark.parametrize("driver,ok", [(12060, False), (13000, True)])
def test_prebuilt_kernels_newer_than_the_driver_are_refused(small_ckpt, tmp_path, monkeypatch, driver, ok):
    """Kernels built with CUDA 13 on a CUDA 12.6 driver (a Jetson Orin on JetPack 6): one line saying so;
    on a CUDA 13 driver they load, and no nvcc is needed."""
    from edgekit.backends.cuda_fused.runner import CudaFusedRunner
    from edgekit.models.checkpoint import load_checkpoint

    fake = install_fake(monkeypatch, tmp_path, nvcc=None)
    fake.modules["pycuda.driver"].get_driver_version = lambda: driver
    build = _prebuilt(tmp_path / "kernels", "13.0")
    if ok:
        runner = CudaFusedRunner(load_checkpoint(small_ckpt), precision="fp16", kernel_build=build)
        assert runner.precision == "fp16"
        return
    with pytest.raises(EdgekitError, match=r"CUDA 13\.0, newer than this driver's CUDA 12\.6") as e:
        CudaFusedRunner(load_checkpoint(small_ckpt), precision="fp16", kernel_build=build)
    assert "\n" not in str(e.value) and "JetPack 6" in str(e.value)


def _fake_nvcc(tmp_path: Path, release: str) -> str:
    exe = tmp_path / "nvcc"
    exe.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.88'\n")
    exe.chmod(0o755)
    return str(exe)


def test_build_refuses_a_toolkit_newer_than_the_target_driver(tmp_path, capsys):
    assert cuda_module.parse_cuda_version("Cuda compilation tools, release 13.0, V13.0.88") == (13, 0)
    assert cuda_module.parse_cuda_version("Build cuda_12.6.r12.6/compiler.34714021_0") == (12, 6)
    assert cuda_module.parse_cuda_version("12.6") == (12, 6) and cuda_module.parse_cuda_version("new") is None
    nvcc = _fake_nvcc(tmp_path, "13.0")  # refused before anything is compiled
    with pytest.raises(EdgekitError, match=r"CUDA 13\.0, newer than the target driver's CUDA 12\.6") as e:
        kbuild.compile_kernels(("sm_87",), nvcc=nvcc, driver_cuda="12.6")
    assert "\n" not in str(e.value)
    with pytest.raises(EdgekitError, match="expected a CUDA version"):
        kbuild.compile_kernels(("sm_87",), nvcc=nvcc, driver_cuda="jetpack6")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(kbuild, "find_nvcc", lambda: nvcc)
    try:
        assert kbuild.main(["--check", "--arch", "sm_87", "--driver-cuda", "12.6"]) == 2
    finally:
        monkeypatch.undo()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: nvcc")


# ------------------------------------------------------------------------------------ the runner


def test_infer_device_refuses_a_cpu_tensor(small_ckpt, tmp_path, monkeypatch):
    from edgekit.backends.cuda_fused.runner import load_cuda_fused

    fake = install_fake(monkeypatch, tmp_path)
    runner = load_cuda_fused(small_ckpt, precision="fp32")
    with pytest.raises(EdgekitError, match="infer_device takes a CUDA tensor, got one on cpu") as e:
        runner.infer_device(torch.zeros(1, 3, *INPUT))
    assert "\n" not in str(e.value)
    assert not fake.queue and not runner._states  # nothing was launched or allocated for it


def test_ensure_context_pushes_the_primary_context_in_another_thread(monkeypatch):
    """PyCUDA's context stack is per thread: a worker thread has no current context until the
    primary one (retained once) is pushed there too."""
    local, retained = threading.local(), []

    class Context:
        def __init__(self, handle):
            self.handle = handle

        def __hash__(self):
            return self.handle

        def push(self):
            local.__dict__.setdefault("stack", []).append(self)

        def pop(self):
            local.stack.pop()

        @staticmethod
        def get_current():
            stack = getattr(local, "stack", [])
            return stack[-1] if stack else None

    class Device:
        def __init__(self, ordinal):
            self.ordinal = ordinal

        def retain_primary_context(self):
            retained.append(self.ordinal)
            return Context(0xC0DE + self.ordinal)

    drv = types.SimpleNamespace(init=lambda: None, Context=Context, Device=Device)
    pkg = types.ModuleType("pycuda")
    pkg.driver, pkg.gpuarray = drv, types.ModuleType("pycuda.gpuarray")
    for name, mod in {"pycuda": pkg, "pycuda.driver": drv, "pycuda.gpuarray": pkg.gpuarray,
                      "pycuda.autoprimaryctx": types.ModuleType("pycuda.autoprimaryctx")}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(cuda_module, "_PRIMARY", {})
    monkeypatch.delenv("CUDA_DEVICE", raising=False)
    seen = {}

    def worker():
        seen["ctx"] = cuda_module.ensure_context()
        seen["current"] = Context.get_current()
        cuda_module.release_context()
        seen["after_release"] = Context.get_current()

    main_ctx = cuda_module.ensure_context()
    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert main_ctx is not None and hash(main_ctx) == 0xC0DE
    assert seen["ctx"] is not None and hash(seen["ctx"]) == hash(main_ctx) and seen["current"] is seen["ctx"]
    assert seen["after_release"] is None
    assert retained == [0]  # retained once per process
    assert cuda_module.ensure_context() is main_ctx  # already current here: nothing pushed again
    main_ctx.pop()


class _FakeLibcuda:
    """The five driver calls _CudaGraph makes; EndCapture hands back a graph handle, as the driver
    does even for an invalidated capture."""

    GRAPH = 0xA11C

    def __init__(self, instantiate_rc=0):
        self.instantiate_rc, self.destroyed, self.exec_destroyed = instantiate_rc, [], []

    def cuStreamBeginCapture_v2(self, stream, mode):
        return 0

    def cuStreamEndCapture(self, stream, p_graph):
        p_graph._obj.value = self.GRAPH
        return 0

    def cuGraphInstantiateWithFlags(self, p_exec, graph, flags):
        if self.instantiate_rc == 0:
            p_exec._obj.value = 0xE8EC
        return self.instantiate_rc

    def cuGraphDestroy(self, graph):
        self.destroyed.append(graph.value)
        return 0

    def cuGraphExecDestroy(self, exe):
        self.exec_destroyed.append(exe.value)
        return 0


def test_graph_capture_failure_frees_the_partial_graph():
    from edgekit.backends.cuda_fused.runner import _CudaGraph

    stream = types.SimpleNamespace(handle=7)
    lib = _FakeLibcuda()

    def enqueue():
        raise RuntimeError("cuLaunchKernel failed: operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="capturing"):
        _CudaGraph(stream, enqueue, lib=lib)
    assert lib.destroyed == [_FakeLibcuda.GRAPH]
    lib = _FakeLibcuda(instantiate_rc=999)
    with pytest.raises(EdgekitError, match="instantiate failed"):
        _CudaGraph(stream, lambda: None, lib=lib)
    assert lib.destroyed == [_FakeLibcuda.GRAPH] and lib.exec_destroyed == []
    lib = _FakeLibcuda()
    graph = _CudaGraph(stream, lambda: None, lib=lib)
    graph.destroy()
    graph.destroy()  # idempotent: __del__ runs it again
    assert lib.destroyed == [_FakeLibcuda.GRAPH] and lib.exec_destroyed == [0xE8EC]


# ------------------------------------------------------------------------------------ packaging


def _can_build_wheels_here() -> bool:
    """setuptools >= 70.1 has bdist_wheel built in; older ones need the wheel package."""
    import importlib.util

    try:
        import setuptools
    except ImportError:
        return False
    version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


def test_wheel_ships_the_cuda_sources(tmp_path):
    """setup.py's wheel holds every file kernel_dir() needs (the kernels and their host-emulation
    harness), and an installed copy finds them inside the package (no source checkout)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(["cp", "-r", str(ROOT / "edgekit"), str(src / "edgekit")], check=True)
    # without build isolation when this environment can build wheels itself (faster, offline)
    isolation = ["--no-build-isolation"] if _can_build_wheels_here() else []
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("edgekit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = {f"edgekit/kernels/cuda/{p.relative_to(ROOT / 'edgekit/kernels/cuda')}"
              for p in (ROOT / "edgekit/kernels/cuda").rglob("*") if p.suffix in (".cu", ".h", ".cpp")}
    assert needed and needed <= names, needed - names
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)  # a wheel is a zip laid out as site-packages
    probe = ("import edgekit.kernels.cuda.gmbinet as G, edgekit.kernels.cuda.gmbi as K; "
             "print(G.layers_source_path()); print(K.kernel_source_path().parent / 'emu')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    layers, emu = (Path(line) for line in out.stdout.split())
    assert layers == site / "edgekit/kernels/cuda/gmbinet_layers.cu" and layers.is_file()
    assert (emu / "gmbinet_emu_main.cpp").is_file()


# ------------------------------------------------------------------------------------ benchmarks/gpu_check.sh


def test_gpu_check_python_imports_resolve():
    """The Python blocks gpu_check.sh runs only on a GPU (its eval step's heredoc) are never executed by
    --dry-run: their imports are checked here, so a moved name cannot fail the first GPU run (the eval
    step imported TorchGpuRunner from edgekit.bench.gpu, which never defined it)."""
    import ast
    import importlib
    import re

    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    blocks = re.findall(r"<<'EOF'[^\n]*\n(.*?)\nEOF\n", text, flags=re.S)
    assert blocks, "no heredoc found in gpu_check.sh"
    checked = 0
    for src in blocks:
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgekit"):
                mod = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(mod, alias.name), f"gpu_check.sh: {node.module} has no {alias.name}"
                    checked += 1
    assert checked >= 4


def test_gpu_check_help_lists_every_step_and_the_returned_files():
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--help"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0
    steps = re.findall(r"^run_step (\w+) ", (ROOT / "benchmarks" / "gpu_check.sh").read_text(), flags=re.M)
    assert steps == ["env", "deps", "pycuda", "tests", "compile", "eval", "bench", "train", "prune"]
    for step in steps:
        assert re.search(rf"^  {step} ", out.stdout, flags=re.M), step
    files = ["summary.txt", "logs.tar.gz", "bench_gpu.json", "bench_gpu.png", "train_best.pt", "train_report.json",
             "prune_0.25.pt", "prune_0.50.pt"]
    assert all(f in out.stdout for f in files) and len(files) <= 8  # the device tool returns at most 8 files
