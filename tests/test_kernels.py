"""Fused GMBI CUDA kernel: BN folding + fp64 reference (CPU), launch planning (CPU), nvcc/ptxas
compile checks (need nvcc), the kernel source executed under host emulation with ASan/UBSan and
TSan (need g++ and the CUDA headers), and the real kernel against the reference (need a GPU and
PyCUDA)."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import needs_emulator
from edgekit.errors import EdgekitError, MissingBackendError
from edgekit.kernels.cuda import build as kbuild
from edgekit.kernels.cuda import gmbi as kgmbi
from edgekit.kernels.cuda import module as cuda_module
from edgekit.kernels.cuda.gmbi import FusedGMBI
from edgekit.kernels.fold import GMBIParams, fold_gmbi, reference_gmbi
from edgekit.kernels.graph import plan_gmbi
from edgekit.models.gmbinet import GMBI

TOL = {"float32": 1e-5, "float16": 2e-3}
NP_DTYPE = {"float32": np.float32, "float16": np.float16}


def random_gmbi(channels: int, seed: int = 0) -> GMBI:
    """A GMBI module in eval mode with random weights and non-trivial BN statistics."""
    g = torch.Generator().manual_seed(seed)
    m = GMBI(channels)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (1.5 / mod.weight[0].numel()) ** 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, torch.nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                mod.weight.copy_(torch.rand(c, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return m.eval()


def rel_l2(y: np.ndarray, ref: np.ndarray) -> float:
    y = y.astype(np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


# ------------------------------------------------------------------------------------ CPU: folding


@pytest.mark.parametrize("channels,shape", [(16, (2, 16, 13, 17)), (32, (1, 32, 24, 24)), (64, (3, 64, 9, 11)),
                                            (128, (1, 128, 16, 16))])
def test_bn_folding_is_exact_in_float64(channels, shape):
    m = random_gmbi(channels, seed=channels).double()
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = m(x)
    got = reference_gmbi(x, fold_gmbi(m))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_folded_params_layout():
    m = random_gmbi(32)
    p = fold_gmbi(m)
    assert (p.channels, p.scales, p.group_channels) == (32, 4, 8)
    assert p.dw_weight.dtype == torch.float64 and p.dw_weight.shape == (32, 9)
    arr = p.kernel_arrays()
    assert arr["pw_wt"].shape == (32, 32) and arr["pw_wt"].dtype == np.float32 and arr["pw_wt"].flags.c_contiguous
    np.testing.assert_allclose(arr["pw_wt"], p.pw_weight.t().numpy(), rtol=1e-6)


def test_fold_rejects_other_modules():
    with pytest.raises(EdgekitError):
        fold_gmbi(torch.nn.Conv2d(4, 4, 1))
    m = random_gmbi(16)
    m.conv1[0].dilation = (1, 1)
    with pytest.raises(EdgekitError, match="dilation 2"):
        fold_gmbi(m)


def test_import_and_missing_pycuda(monkeypatch):
    import edgekit.kernels  # noqa: F401  (must import without pycuda)

    for name in ("pycuda", "pycuda.driver", "pycuda.gpuarray"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingBackendError, match="pip install pycuda"):
        FusedGMBI(random_gmbi(16))
    with pytest.raises(MissingBackendError):
        kgmbi.load_kernel_module()


# ------------------------------------------------------------------------------------ CPU: planning

NET_SHAPES = [(32, 128, 128), (64, 64, 64), (96, 32, 32), (128, 16, 16)]  # GMBINet at 512x512


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("c,h,w", NET_SHAPES + [(32, 37, 53), (8, 5, 7)])
@pytest.mark.parametrize("sm_count,smem_limit", [(132, 227 * 1024), (16, 163 * 1024), (58, 99 * 1024)])
def test_plan_invariants(n, c, h, w, sm_count, smem_limit):
    p = plan_gmbi(n, c, h, w, sm_count=sm_count, smem_limit=smem_limit)
    assert p.smem_bytes <= smem_limit
    assert p.co_per_block % 4 == 0 and p.co_per_block * p.co_splits >= c > p.co_per_block * (p.co_splits - 1)
    assert p.grid == (-(-w // p.tile_w), -(-h // p.tile_h), n * p.co_splits)
    assert p.tile_h <= h and p.tile_w <= w
    buf_a, buf_b, smem = kgmbi.smem_layout(c, p.tile_h, p.tile_w, h, w)
    assert (p.buf_a, p.buf_b, p.smem_bytes) == (buf_a, buf_b, smem)


def test_plan_overrides_and_errors():
    p = plan_gmbi(1, 40, 37, 53, tile=(8, 16), co_splits=3)
    assert (p.tile_h, p.tile_w, p.co_per_block, p.co_splits) == (8, 16, 16, 3)
    with pytest.raises(EdgekitError, match="shared memory"):
        plan_gmbi(1, 128, 64, 64, tile=(32, 32), smem_limit=99 * 1024)
    with pytest.raises(EdgekitError, match="channels"):
        plan_gmbi(1, 30, 16, 16)
    with pytest.raises(EdgekitError, match="channels"):
        plan_gmbi(1, 132, 16, 16)  # G = 33 > 32


# ------------------------------------------------------------------------------------ CPU: ptxas report parsing

PTXAS_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'gmbi_fused_f16' for 'sm_87'
ptxas info    : Function properties for gmbi_fused_f16
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 436 bytes cmem[0]
ptxas info    : Compiling entry function 'gmbi_fused_f32' for 'sm_90'
ptxas info    : Function properties for gmbi_fused_f32
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem
"""


def test_parse_ptxas():
    r = kbuild.parse_ptxas(PTXAS_SAMPLE)
    assert [(k.kernel, k.arch) for k in r] == [("gmbi_fused_f16", "sm_87"), ("gmbi_fused_f32", "sm_90")]
    assert (r[0].registers, r[0].barriers, r[0].cmem, r[0].spills) == (64, 1, 436, False)
    assert (r[1].registers, r[1].smem_static, r[1].stack, r[1].spill_stores, r[1].spill_loads) == (255, 1024, 24, 8, 12)
    assert r[1].spills


# ------------------------------------------------------------------------------------ nvcc compile checks

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not on PATH")


@needs_nvcc
def test_nvcc_compiles_without_spills():
    res = kbuild.compile_kernels(("sm_87", "sm_89", "sm_90"), fmt="cubin")  # raises on errors / spills
    print("\n" + res.table())
    seen = {(r.arch, r.kernel) for r in res.resources}
    for arch in ("sm_87", "sm_89", "sm_90"):
        for kernel in ("gmbi_fused_f32", "gmbi_fused_f16"):
            assert (arch, kernel) in seen
    for r in res.resources:
        assert r.spill_stores == 0 and r.spill_loads == 0, r
        assert r.stack == 0, r
        assert 0 < r.registers <= 255
    assert not [w for w in res.warnings if "ptxas" in w.lower()], res.warnings


@needs_nvcc
def test_fatbin_build_manifest_and_prebuilt_lookup(tmp_path, monkeypatch):
    res = kbuild.compile_kernels(("sm_87", "sm_90"), fmt="fatbin", out_dir=tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["source_sha256"] == kgmbi.source_sha256()
    assert manifest["artifacts"] == {"sm_87": "gmbi_fused.fatbin", "sm_90": "gmbi_fused.fatbin"}
    assert (tmp_path / "gmbi_fused.fatbin").stat().st_size > 0
    assert all(not r.spills for r in res.resources)
    assert manifest["cuda_version"] == "%d.%d" % cuda_module.nvcc_cuda_version(kbuild.find_nvcc())
    src = kgmbi.kernel_source_path()
    assert cuda_module.prebuilt_artifact(src, "sm_90", tmp_path)[0] == tmp_path / "gmbi_fused.fatbin"
    assert cuda_module.prebuilt_artifact(src, "sm_89", tmp_path)[0] is None  # not in this build: compile at run time
    manifest["sources"]["gmbi_fused.cu"]["sha256"] = "0" * 64  # stale build: never used
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert cuda_module.prebuilt_artifact(src, "sm_90", tmp_path)[0] is None


def test_compile_kernels_errors(tmp_path):
    with pytest.raises(EdgekitError, match="architecture"):
        kbuild.compile_kernels(("90",))
    with pytest.raises(EdgekitError, match="nvcc"):
        kbuild.compile_kernels(("sm_90",), nvcc=str(tmp_path / "no-nvcc"))


# ------------------------------------------------------------------------------------ kernel source under host emulation



@pytest.fixture(scope="module")
def asan_emulator(tmp_path_factory):
    return kbuild.build_emulator(tmp_path_factory.mktemp("emu") / "gmbi_emu_asan", sanitize="address")


# (n, c, h, w, tile, co_splits): partial tiles, tiles larger than the image, several lanes per warp
# (G > 8), fewer lanes than warps (G < 8), uneven output-channel splits, batch > 1.
EMU_CASES = [
    (2, 8, 19, 23, (8, 8), 2),
    (1, 40, 37, 53, (8, 16), 3),
    (3, 16, 5, 7, None, None),
    (1, 32, 16, 16, (16, 16), None),
    (1, 4, 3, 41, (8, 8), 1),
    (1, 128, 16, 16, None, None),
    (2, 96, 12, 10, (8, 8), 5),
]


@needs_emulator
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("n,c,h,w,tile,splits", EMU_CASES)
def test_emulated_kernel_matches_reference(asan_emulator, dtype, n, c, h, w, tile, splits):
    params = fold_gmbi(random_gmbi(c, seed=c + h))
    x = np.random.default_rng(c * w).standard_normal((n, c, h, w)).astype(NP_DTYPE[dtype])
    plan = plan_gmbi(n, c, h, w, tile=tile, co_splits=splits)
    y = kgmbi.run_emulated(asan_emulator, x, params, plan)  # output poisoned with NaN before the launch
    assert not np.isnan(y).any(), "the kernel left output elements unwritten"
    ref = reference_gmbi(torch.from_numpy(x.astype(np.float64)), params).numpy()
    assert rel_l2(y, ref) <= TOL[dtype]


@needs_emulator
def test_emulated_kernel_has_no_data_races(tmp_path):
    exe = kbuild.build_emulator(tmp_path / "gmbi_emu_tsan", sanitize="thread")
    params = fold_gmbi(random_gmbi(40, seed=3))
    x = np.random.default_rng(0).standard_normal((1, 40, 13, 18)).astype(np.float32)
    plan = plan_gmbi(1, 40, 13, 18, tile=(8, 8), co_splits=2)
    y = kgmbi.run_emulated(exe, x, params, plan)  # TSan exits non-zero on a race -> EdgekitError
    ref = reference_gmbi(torch.from_numpy(x.astype(np.float64)), params).numpy()
    assert rel_l2(y, ref) <= TOL["float32"]


# ------------------------------------------------------------------------------------ CPU: the PyCUDA wrapper on a fake GPU
# A stand-in for the few PyCUDA calls FusedGMBI makes.  Device "memory" is numpy arrays keyed by
# fake addresses; a kernel launch decodes the packed arguments exactly as the real kernel would
# receive them and runs the kernel source under host emulation.  This checks the wrapper's
# plumbing (argument order, grid, shared-memory size and opt-in, dtype dispatch) without a GPU.


class _FakeCuda:
    def __init__(self, emulator, sm_count=132, smem_optin=227 * 1024):
        import types

        self.emulator, self.mem, self.next_ptr, self.calls = emulator, {}, 0x10000, []
        fake = self
        self.sm_count, self.smem_optin = sm_count, smem_optin

        class Device:
            def compute_capability(self):
                return (9, 0)

            def get_attribute(self, attr):
                return {"MULTIPROCESSOR_COUNT": fake.sm_count, "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN": fake.smem_optin}[attr]

        class Context:
            @staticmethod
            def get_current():
                return ctx

            @staticmethod
            def get_device():
                return Device()

        ctx = Context()

        class Function:
            def __init__(self, name):
                self.name, self.max_dyn_smem = name, 48 * 1024

            def prepare(self, fmt):
                self.fmt = fmt

            def set_attribute(self, attr, value):
                assert attr == "MAX_DYNAMIC_SHARED_SIZE_BYTES"
                self.max_dyn_smem = value

            def prepared_async_call(self, grid, block, stream, *args, shared_size=0):
                fake.calls.append((self.name, grid, block, stream, args, shared_size))
                assert len(args) == len(self.fmt) and shared_size <= self.max_dyn_smem
                fake.run_kernel(self.name, grid, block, args, shared_size)

        class Module:
            def get_function(self, name):
                return Function(name)

        class GPUArray:
            def __init__(self, host):
                self.host = host
                self.ptr = fake.next_ptr
                fake.next_ptr += (host.nbytes + 255) // 256 * 256 + 256
                fake.mem[self.ptr] = self
                self.shape, self.dtype, self.nbytes, self.flags = host.shape, host.dtype, host.nbytes, host.flags

            def get(self):
                return self.host.copy()

        drv = types.ModuleType("pycuda.driver")
        drv.init = lambda: None
        drv.Context = Context
        drv.device_attribute = types.SimpleNamespace(MULTIPROCESSOR_COUNT="MULTIPROCESSOR_COUNT",
                                                     MAX_SHARED_MEMORY_PER_BLOCK_OPTIN="MAX_SHARED_MEMORY_PER_BLOCK_OPTIN")
        drv.function_attribute = types.SimpleNamespace(MAX_DYNAMIC_SHARED_SIZE_BYTES="MAX_DYNAMIC_SHARED_SIZE_BYTES")
        drv.module_from_buffer = lambda buf: Module()
        drv.module_from_file = lambda path: Module()
        ga = types.ModuleType("pycuda.gpuarray")
        ga.to_gpu = lambda a: GPUArray(np.array(a, copy=True, order="C"))
        ga.empty = lambda shape, dtype: GPUArray(np.empty(shape, dtype))
        comp = types.ModuleType("pycuda.compiler")
        comp.compile = lambda source, **kw: fake.calls.append(("compile", kw)) or b"cubin"
        pkg = types.ModuleType("pycuda")
        pkg.driver, pkg.gpuarray, pkg.compiler = drv, ga, comp
        self.modules = {"pycuda": pkg, "pycuda.driver": drv, "pycuda.gpuarray": ga, "pycuda.compiler": comp}

    def run_kernel(self, name, grid, block, args, smem):
        x, out = self.mem[args[0]], self.mem[args[1]]
        dw_w, dw_b, pw_wt, pw_b = (self.mem[a].host for a in args[2:6])
        c, h, w, tile_h, tile_w, cob, splits, buf_a, buf_b = args[6:]
        assert name == {np.float32: "gmbi_fused_f32", np.float16: "gmbi_fused_f16"}[x.dtype.type]
        n = grid[2] // splits
        assert grid == (-(-w // tile_w), -(-h // tile_h), n * splits) and block == (256, 1, 1)
        plan = kgmbi.GMBIPlan(n=n, channels=c, height=h, width=w, tile_h=tile_h, tile_w=tile_w, co_per_block=cob,
                              co_splits=splits, buf_a=buf_a, buf_b=buf_b, smem_bytes=smem, grid=grid)
        params = GMBIParams(channels=c, scales=4, dw_weight=torch.from_numpy(dw_w).double(),
                                  dw_bias=torch.from_numpy(dw_b).double(),
                                  pw_weight=torch.from_numpy(pw_wt).double().t(), pw_bias=torch.from_numpy(pw_b).double())
        out.host[...] = kgmbi.run_emulated(self.emulator, x.host, params, plan)


@needs_emulator
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fused_wrapper_on_fake_gpu(asan_emulator, monkeypatch, dtype):
    fake = _FakeCuda(asan_emulator, sm_count=8)
    for name, mod in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(cuda_module, "_MODULES", {})
    monkeypatch.setenv("EDGEKIT_KERNEL_BUILD_DIR", "/nonexistent")  # force the run-time compile path
    monkeypatch.setattr(cuda_module, "find_nvcc", lambda: "nvcc")  # the fake compiler stands in for nvcc
    params = fold_gmbi(random_gmbi(24, seed=4))
    fused = FusedGMBI(params, dtype=dtype)
    compile_kw = [c[1] for c in fake.calls if c[0] == "compile"][0]
    assert compile_kw["no_extern_c"] and compile_kw["arch"] == "sm_90"
    x = np.random.default_rng(9).standard_normal((2, 24, 40, 36)).astype(NP_DTYPE[dtype])
    xg = fake.modules["pycuda.gpuarray"].to_gpu(x)
    out = fake.modules["pycuda.gpuarray"].to_gpu(np.full_like(x, np.nan))
    fused(xg, out=out, stream="s0")
    name, grid, block, stream, args, smem = fake.calls[-1]
    plan = fused.plan(2, 40, 36)
    assert (grid, smem, stream) == (plan.grid, plan.smem_bytes, "s0")
    y = out.get()
    assert not np.isnan(y).any()
    ref = reference_gmbi(torch.from_numpy(x.astype(np.float64)), params).numpy()
    assert rel_l2(y, ref) <= TOL[dtype]
    # a plan needing more than 48 KB opts in to the larger dynamic shared memory first
    big = fused.plan(2, 40, 36, tile=(16, 16), co_splits=1)
    assert big.smem_bytes > 48 * 1024
    fused(xg, out=out, plan=big)
    assert fake.calls[-1][5] == big.smem_bytes
    with pytest.raises(EdgekitError, match="overlap"):
        fused(xg, out=xg)


# ------------------------------------------------------------------------------------ GPU


def _cuda_device() -> bool:
    try:
        import pycuda.driver as drv

        drv.init()
        return drv.Device.count() > 0
    except Exception:
        return False


needs_gpu = pytest.mark.skipif(not _cuda_device(), reason="no CUDA device / pycuda not installed")

GPU_SHAPES = NET_SHAPES + [(32, 37, 53), (64, 37, 53), (16, 7, 5)]


def _run_fused(fused, x, **kw):
    from pycuda import gpuarray

    xg = gpuarray.to_gpu(x)
    out = gpuarray.to_gpu(np.full_like(x, np.nan))  # poison: every element must be written
    fused(xg, out=out, **kw)
    return out.get()


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("c,h,w", GPU_SHAPES)
def test_fused_kernel_matches_reference(dtype, n, c, h, w):
    m = random_gmbi(c, seed=c)
    params = fold_gmbi(m)
    fused = FusedGMBI(params, dtype=dtype)
    x = np.random.default_rng(n * h + w).standard_normal((n, c, h, w)).astype(NP_DTYPE[dtype])
    y = _run_fused(fused, x)
    assert not np.isnan(y).any(), "the kernel left output elements unwritten"
    ref = reference_gmbi(torch.from_numpy(x.astype(np.float64)), params).numpy()
    assert rel_l2(y, ref) <= TOL[dtype]


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("tile", [(16, 16), (8, 16), (8, 8), (4, 32)])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_fused_kernel_explicit_plans(dtype, tile, splits):
    c, h, w = 64, 37, 53
    params = fold_gmbi(random_gmbi(c, seed=7))
    fused = FusedGMBI(params, dtype=dtype)
    x = np.random.default_rng(5).standard_normal((2, c, h, w)).astype(NP_DTYPE[dtype])
    y = _run_fused(fused, x, plan=fused.plan(2, h, w, tile=tile, co_splits=splits))
    assert not np.isnan(y).any()
    ref = reference_gmbi(torch.from_numpy(x.astype(np.float64)), params).numpy()
    assert rel_l2(y, ref) <= TOL[dtype]


@needs_gpu
def test_fused_kernel_raw_pointers_on_a_stream():
    import pycuda.driver as drv
    from pycuda import gpuarray

    c, h, w = 32, 64, 64
    params = fold_gmbi(random_gmbi(c, seed=11))
    fused = FusedGMBI(params, dtype="float16")
    x = np.random.default_rng(2).standard_normal((1, c, h, w)).astype(np.float16)
    # (uploaded NaN arrays rather than gpuarray.fill, which has no float16 support in PyCUDA)
    xg, mid, out = (gpuarray.to_gpu(a) for a in (x, np.full_like(x, np.nan), np.full_like(x, np.nan)))
    stream = drv.Stream()
    fused.launch(xg.ptr, mid.ptr, 1, h, w, stream=stream)  # two chained modules, as a runtime would
    fused.launch(mid.ptr, out.ptr, 1, h, w, stream=stream)
    stream.synchronize()
    y = out.get()
    ref = reference_gmbi(reference_gmbi(torch.from_numpy(x.astype(np.float64)), params), params).numpy()
    assert not np.isnan(y).any()
    assert rel_l2(y, ref) <= 4e-3
    with pytest.raises(EdgekitError, match="alias"):
        fused.launch(xg.ptr, xg.ptr, 1, h, w)
