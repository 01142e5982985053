"""cpu-fused's opt-in avx512amx level: the GMBI modules' 1x1 as bf16 tile products on AMX (fp32 accumulation),
everything else the fp32 AVX-512 kernels.  Skipped (with the reason) on a CPU without AMX-BF16 or where the OS does
not grant the tile state.

The bound the 1x1 is held to, element by element, against PyTorch's fp32 layer on the kernel's own input buffer:
each z and each weight is rounded to nearest bf16 (8 significant bits: relative error <= u = 2^-8 each), so each
product is off by at most (1 + u)^2 - 1 = 2^-7 + 2^-16 of |z w|, the sum by at most that times sum_k |z_k| |w_k|,
and ReLU (1-Lipschitz) and the residual add do not grow it; plus the fp32 tolerance every other kernel gets (1e-4 of the layer's largest value) for the
accumulation order and the chain.  And the module must be far closer to the same arithmetic done in float64 with
bf16-rounded z and weights than to fp32 (the 1x1 really ran in bf16, with every pair of K where it belongs).

The chain before it runs in fp16 in this library (AVX512-FP16), so each z the 1x1 rounds is itself off by up to E_z,
a bound propagated element by element through the chain beside PyTorch's values (``fp16_chain_z``): u = 2^-11
(fp16's unit roundoff) for every input rounded to fp16; a depthwise stage adds (1 + u)^2 sum |w| E_in of its input's
error, and 7u (sum |w| (|a| + E_in) + |b|) for the fp16 weights, bias and the five roundings a term passes through
(three chains of FMAs, two adds: gamma_5 (1 + u) + u < 7u); ReLU and sigma' <= 1/4 do not grow it, the kernel's fp16
sigmoid adds SIG16 (its max |error| over every finite fp16 input >= 0 is 1.51 x 2^-11, checked exhaustively, so 2^-10);
a guidance or enhancement FMA g v + v adds (1 + g + E_g) E_v + (|v| + E_v) E_g and its own rounding.  The 1x1's
bound then becomes sum_k |w_k| ((2^-7 + 2^-16) |z_k| + (1 + 2^-8)^2 E_z,k): with z_k + e rounded to bf16 and w_k
rounded, w_k z_k is off by |w_k| ((2u_b + u_b^2) |z_k| + (1 + u_b)^2 |e|), u_b = 2^-8.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_gmbinet

from edgekit.kernels.cpu import build as cpu_build
from edgekit.kernels.cpu import runtime as cpu_fused
from test_cpu_fused import check_every_layer  # noqa: E402
from test_cpu_fused_widths import ODD, PRUNED_EXACT, TINY_ODD, WIDE_ODD  # noqa: E402

ISA = "avx512amx"


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    if shutil.which("g++") is None:
        pytest.skip("cpu-fused builds its kernels with g++, which is not installed")
    if ISA not in cpu_fused.supported_isas():
        pytest.skip("this CPU has no AMX-BF16 (or no AVX-512): the avx512amx library cannot run here")
    out = tmp_path_factory.mktemp("cpu_fused_amx") / f"libgmbinet_{ISA}.so"
    cpu_build.build_library(ISA, out)
    if not cpu_fused.CpuKernels(out, 1).amx_active:
        pytest.skip("the OS did not grant this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM refused)")
    return out


def fused(library: Path, model, threads: int, fuse_head: bool = True):
    from edgekit.kernels.fold import fold_gmbinet

    net = fold_gmbinet(model, channel_multiple=1)
    blob, offsets = net.param_layout()
    kernels = cpu_fused.CpuKernels(library, threads)
    assert kernels.isa == ISA and kernels.amx_active
    return cpu_fused.FusedNet(kernels, net, blob, offsets, fuse_head=fuse_head)


def bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bf16 (ties to even), as float32."""
    b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


U16 = 2.0 ** -11   # fp16's unit roundoff (round to nearest even)
SIG16 = 2.0 ** -10  # the kernel's fp16 sigmoid: max |error| 1.51 x 2^-11 over every finite fp16 input >= 0


def fp16_chain_z(arrays, x: np.ndarray):
    """(z, E_z) of a GMBI module's chain on input ``x``, in float64 from its folded depthwise arrays: PyTorch's
    chain (split, dilated depthwise + ReLU, forward guidance, backward enhancement, concat) and, beside it, the
    element-wise bound E_z on how far the kernel's fp16 chain can be from it (the module docstring derives it)."""
    import torch.nn.functional as F

    u = U16
    X = torch.from_numpy(np.ascontiguousarray(x)).double()
    C = X.shape[1]
    G = C // 4
    w = torch.from_numpy(arrays["dw_w"]).double().reshape(C, 1, 3, 3)
    b = torch.from_numpy(arrays["dw_b"]).double()

    def dw(a, i, absolute=False):
        wi, bi = w[i * G:(i + 1) * G], b[i * G:(i + 1) * G]
        if absolute:
            return F.conv2d(a, wi.abs(), None, padding=i + 1, dilation=i + 1, groups=G)
        return F.conv2d(a, wi, bi, padding=i + 1, dilation=i + 1, groups=G)

    def fma_bound(g, eg, v, ev):  # |fl16(g^ v^ + v^) - (g v + v)|, g in [0, 1]
        return (1 + g + eg) * ev + (v.abs() + ev) * eg + u * (1 + g + eg) * (v.abs() + ev)

    xs = X.split(G, dim=1)
    ys, eys, gs, egs = [], [], [], []
    a, ea = xs[0], u * xs[0].abs()
    for i in range(4):
        if i > 0:
            xi = xs[i]
            a, ea = gs[-1] * xi + xi, fma_bound(gs[-1], egs[-1], xi, u * xi.abs())
        y = dw(a, i).clamp_min(0)
        bias = b[i * G:(i + 1) * G].abs().view(1, -1, 1, 1)
        ey = (1 + u) ** 2 * dw(ea, i, True) + 7 * u * (dw(a.abs() + ea, i, True) + bias)
        g = torch.sigmoid(y)
        ys.append(y), eys.append(ey), gs.append(g), egs.append(ey / 4 + SIG16)
    zs = [gs[i + 1] * ys[i] + ys[i] for i in range(3)] + [ys[3]]
    ezs = [fma_bound(gs[i + 1], egs[i + 1], ys[i], eys[i]) for i in range(3)] + [eys[3]]
    return torch.cat(zs, 1).numpy(), torch.cat(ezs, 1).numpy()


def f16(v) -> np.ndarray:
    """-> the nearest fp16 (ties to even), as float64 (an FMA's exact float64 result rounds once)."""
    return np.asarray(v, dtype=np.float64).astype(np.float16).astype(np.float64)


def fp16_chain_emulated(arrays, x: np.ndarray) -> np.ndarray:
    """z of a GMBI module's chain done as the kernel does it in fp16, op by op and in its order (each FMA rounded
    once, the three tap rows summed apart then added), but for the sigmoid, taken exact and rounded to fp16 (the
    kernel's is within 1.51 x 2^-11 of that).  Returns z as float64."""
    x = f16(x)
    C, H, W = x.shape[1:]
    G = C // 4
    w, b = f16(arrays["dw_w"]), f16(arrays["dw_b"])

    def dw(a, i):  # a: N x G x H x W fp16 values
        d = i + 1
        pad = np.pad(a, ((0, 0), (0, 0), (d, d), (d, d)))
        tap = lambda ky, kx: pad[:, :, ky * d:ky * d + H, kx * d:kx * d + W]  # noqa: E731
        wt = lambda k: w[i * G:(i + 1) * G, k].reshape(1, G, 1, 1)  # noqa: E731
        rows = []
        for ky in range(3):
            acc = f16(wt(3 * ky) * tap(ky, 0) + (b[i * G:(i + 1) * G].reshape(1, G, 1, 1) if ky == 0 else 0.0))
            acc = f16(wt(3 * ky + 1) * tap(ky, 1) + acc)
            rows.append(f16(wt(3 * ky + 2) * tap(ky, 2) + acc))
        return np.maximum(f16(f16(rows[0] + rows[1]) + rows[2]), 0.0)

    xs = [x[:, i * G:(i + 1) * G] for i in range(4)]
    ys, gs = [], []
    a = xs[0]
    for i in range(4):
        if i > 0:
            a = f16(gs[-1] * xs[i] + xs[i])
        ys.append(dw(a, i))
        gs.append(f16(1.0 / (1.0 + np.exp(-ys[-1]))))
    zs = [f16(gs[i + 1] * ys[i] + ys[i]) for i in range(3)] + [ys[3]]
    return np.concatenate(zs, axis=1)


def gmbi_refs(model, net, layer: str, x: np.ndarray):
    """(fp32 PyTorch output, the same module with the fp16 chain emulated and bf16-rounded z and weights in
    float64, the element-wise bound
    of the fp16 chain + bf16 1x1: sum_k |w_k| ((2^-7 + 2^-16) |z_k| + (1 + 2^-8)^2 E_z,k)) of GMBI module ``layer``
    on input ``x``."""
    s, i = layer[4:].split("_")
    blk = getattr(model, f"encoder{s}")[int(i)]
    z = {}
    h = blk.fusion.register_forward_pre_hook(lambda _m, inp: z.update(z=inp[0].numpy().copy()))  # returns None
    with torch.no_grad():
        ref32 = blk(torch.from_numpy(x)).numpy()
    h.remove()
    a = net.layers[layer].arrays
    w, b = a["pw_wt"].astype(np.float64), a["pw_b"].astype(np.float64)[None, :, None, None]
    z16 = fp16_chain_emulated(a, x).astype(np.float32)  # the kernel's chain in fp16, then its bf16 1x1
    out = np.einsum("nkhw,kc->nchw", bf16(z16).astype(np.float64), bf16(a["pw_wt"]).astype(np.float64)) + b
    ref_bf = np.maximum(out, 0) + x
    z64, ez = fp16_chain_z(a, x)
    assert np.abs(z64 - z["z"]).max() <= 1e-4 * max(1.0, float(np.abs(z64).max()))  # the float64 chain is PyTorch's
    bound = np.einsum("nkhw,kc->nchw", (2.0 ** -7 + 2.0 ** -16) * np.abs(z64) + (1 + 2.0 ** -8) ** 2 * ez, np.abs(w))
    return ref32, ref_bf, bound


def fp16_storage_bound(ref: np.ndarray, dtype: str) -> np.ndarray:
    """How far a non-GMBI op's stored output may be from its PyTorch layer, element by element: the fp32
    tolerance every kernel gets (t = 1e-4 of the layer's largest value, accumulation order); an fp16-stored
    output (the stem's e1 in this library) is then rounded once to nearest fp16: the computed v (|v - ref| <= t)
    moves by at most u |v| <= u (|ref| + t), u = 2^-11, or half the subnormal spacing 2^-25 below 2^-14."""
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    if dtype == "float32":
        return np.full(ref.shape, tol)
    assert dtype == "float16", dtype
    return tol + U16 * (np.abs(ref) + tol) + 2.0 ** -25


def check_gmbi_in_bf16(fn, model, x: np.ndarray, mode: str) -> int:
    """Run the program op by op from a NaN-poisoned arena: each GMBI module within the bf16 bound of its PyTorch
    layer and close to the bf16 arithmetic; every other op within the fp32 tolerance of its PyTorch layer."""
    from edgekit.kernels.cpu.runtime import EkOp
    from test_cpu_fused import torch_layer

    plan, acts, ops, layers = fn.state(x.shape[0], *x.shape[2:])
    acts.fill(0xFF)
    fn.view(plan, acts, plan.input)[...] = x
    by_layer = {ln.layer: ln for ln in plan.launches}
    checked = 0
    for op, names in zip(ops, layers):
        ln = by_layer[names[0]]
        io = [v for k, v in ln.args if k == "act"]
        if ln.kind != "gmbi":
            # an fp16-stored input is read as the fp16 values the kernel widens exactly
            ins = [fn.view(plan, acts, b).astype(np.float32) for b in ([io[0], io[1]] if ln.kind == "up" else [io[0]])]
            if ln.kind == "head":
                ins.append(x)
            fn.kernels.run((EkOp * 1)(op))
            got = fn.view(plan, acts, io[-1]).astype(np.float64)
            with torch.no_grad():
                ref = torch_layer(model, ln.layer, ins).numpy()
            assert not np.isnan(got).any(), ln.layer
            excess = np.abs(got - ref) - fp16_storage_bound(ref, plan.buffers[io[-1]].dtype)
            assert excess.max() <= 0, (ln.layer, float(excess.max()))
            continue
        assert op.u.gmbi.mode == cpu_fused.GMBI_MODES[mode] and not op.u.gmbi.pw_q
        half = plan.buffers[io[1]].dtype == "float16"
        assert plan.buffers[io[0]].dtype == plan.buffers[io[1]].dtype  # a banded module: both fp16 or neither
        assert op.flags == (3 if half else 0)
        xin = fn.view(plan, acts, io[0]).astype(np.float32)  # an fp16 input: the values the kernel reads
        fn.kernels.run((EkOp * 1)(op))
        got = fn.view(plan, acts, io[1]).astype(np.float64)
        assert not np.isnan(got).any(), f"{ln.layer}: output not fully written"
        ref32, ref_bf, bound = gmbi_refs(model, fn.net, ln.layer, xin)
        fp32_tol = 1e-4 * max(1.0, float(np.abs(ref32).max()))
        if half:  # the result (within bound + tol of ref32) rounded once to fp16: u of it, or half a subnormal step
            bound = bound + U16 * (np.abs(ref32) + bound + fp32_tol) + 2.0 ** -25
        excess = np.abs(got - ref32) - (bound + fp32_tol)
        assert excess.max() <= 0, (ln.layer, float(excess.max()))
        # fp16 chain + bf16 1x1, not fp32 with noise: the kernel sits much closer to that arithmetic emulated than
        # the emulation sits to fp32 (a pair of K multiplied by the wrong weights would put it far from both)
        if half:  # compare in the storage's precision: the emulation's result rounded to fp16 as the kernel's is
            ref_bf = f16(ref_bf)
        d_bf, d_32 = float(np.abs(got - ref_bf).mean()), float(np.abs(ref_bf - ref32).mean())
        assert d_32 > 0 and d_bf <= 0.25 * d_32, (ln.layer, d_bf, d_32)
        checked += 1
    return checked


@pytest.mark.parametrize("mode", ["banded", "two-phase"])
@pytest.mark.parametrize("cfg,shape,threads", [
    (ODD, (2, 3, 37, 53), 2),           # lanes 5, 7, 9, 11: 2G = 10..22 pair rows, padded to 16 / 32
    (PRUNED_EXACT, (1, 3, 45, 31), 1),  # the prune 0.125 --exact widths: 2G = 28, 42, 56
    (TINY_ODD, (3, 5, 23, 19), 2),      # one-lane modules (C = 4: 2 pair rows of 16)
    (WIDE_ODD, (1, 3, 50, 41), 2),      # C = 68: five co tiles, the last with 4 rows
])
def test_gmbi_1x1_on_amx_within_the_bf16_bound_at_odd_widths(library, monkeypatch, mode, cfg, shape, threads):
    monkeypatch.setattr(cpu_fused, "GMBI_TWO_PHASE_MAX_ROWS", 0 if mode == "banded" else 10 ** 6)
    model = random_gmbinet(cfg, seed=sum(shape) + threads)
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    fn = fused(library, model, threads, fuse_head=False)
    assert check_gmbi_in_bf16(fn, model, x, mode) == sum(cfg.depths)


@pytest.mark.parametrize("cfg,shape,threads", [
    (ODD, (1, 3, 37, 53), 2),       # lanes 5..11: runs of 4 lanes split 1+1, 1+1, 1+2, 1+2 (a partial last run)
    (WIDE_ODD, (1, 3, 50, 41), 2),  # 17 lanes: 8 + 9
    (ODD, (1, 3, 29, 33), 3),       # three threads where a module has 3 runs, the row-band cut where it has 2
    (ODD, (3, 3, 29, 33), 2),       # a batch: the crosswise cut (owned lanes are for one image)
])
def test_two_phase_owned_lanes_give_the_one_thread_result_bit_for_bit(library, monkeypatch, cfg, shape, threads):
    """On 2+ threads a two-phase module keeps each thread's lanes through both phases (the 1x1 for those lanes'
    channels, from lane-major A tiles); every output element is the same tile products in the same order as the
    1-thread row-band cut, so the whole network (outputs poisoned) must match it exactly."""
    monkeypatch.setattr(cpu_fused, "GMBI_TWO_PHASE_MAX_ROWS", 10 ** 6)
    model = random_gmbinet(cfg, seed=sum(shape) + 5 * threads)
    x = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
    one = fused(library, model, 1).forward(x, poison=True)
    many = fused(library, model, threads).forward(x, poison=True)
    assert not np.isnan(many).any()
    assert np.array_equal(one, many), float(np.abs(one - many).max())


def test_the_stem_output_is_stored_as_fp16_and_read_as_such(library):
    """This library stores e1 (the stem's output, read by down2 and DF1) as fp16: the plan says so (the views and
    the op-by-op tests read it as fp16), the stem carries out_half and exactly its readers x_half; an fp32
    library keeps every buffer fp32 and no flag."""
    fn = fused(library, random_gmbinet(ODD, seed=3), 2)
    plan, _, ops, layers = fn.state(1, 37, 53)
    assert plan.buffers["e1"].dtype == "float16" and [b for b in plan.buffers.values() if b.dtype == "float16"] \
        == [plan.buffers["e1"]]
    flags = {names[0]: op.flags for op, names in zip(ops, layers)}
    assert flags["stem"] == cpu_fused.EK_FLAGS["out_half"]
    assert flags["down2"] == flags["DF1"] == cpu_fused.EK_FLAGS["x_half"]
    assert not any(f for name, f in flags.items() if name not in ("stem", "down2", "DF1"))
    if "avx512" in cpu_fused.supported_isas():
        lib32 = library.parent / "libgmbinet_avx512.so"
        cpu_build.build_library("avx512", lib32)
        from edgekit.kernels.fold import fold_gmbinet

        net = fold_gmbinet(random_gmbinet(ODD, seed=3), channel_multiple=1)
        blob, offsets = net.param_layout()
        fp32 = cpu_fused.FusedNet(cpu_fused.CpuKernels(lib32, 2), net, blob, offsets)
        plan32, _, ops32, _ = fp32.state(1, 37, 53)
        assert fp32.kernels.half_storage_flags == 0
        assert all(b.dtype == "float32" for b in plan32.buffers.values()) and not any(op.flags for op in ops32)


def fp32_storage_rounded(library, model, threads: int, x: np.ndarray, names) -> np.ndarray:
    """The network on the same library with every buffer fp32 (no flags), run op by op from a NaN-poisoned arena,
    the buffers ``names`` rounded in place to the nearest fp16 (numpy, ties to even) after every op: what fp16
    storage of those buffers must give bit for bit (the epilogues round once; the readers widen exactly; the
    fp16 chain rounds its fp32 x to the same fp16 values)."""
    from edgekit.kernels.cpu.runtime import EkOp

    fn = fused(library, model, threads)
    fn.kernels.half_storage_flags = 0  # this runner's program keeps every buffer in fp32
    plan, acts, ops, _ = fn.state(x.shape[0], *x.shape[2:])
    assert all(b.dtype == "float32" for b in plan.buffers.values()) and not any(op.flags for op in ops)
    acts.fill(0xFF)
    fn.view(plan, acts, plan.input)[...] = x
    for op in ops:
        fn.kernels.run((EkOp * 1)(op))
        for name in names:
            v = fn.view(plan, acts, name)
            v[...] = v.astype(np.float16).astype(np.float32)
    return fn.view(plan, acts, plan.output).copy()


@pytest.mark.parametrize("cfg,shape,threads", [
    (ODD, (1, 3, 37, 53), 1),
    (ODD, (2, 3, 37, 53), 2),
    (TINY_ODD, (3, 5, 23, 19), 2),      # e1 of 23 x 19 -> 12 x 10: band tails shorter than a vector
    (PRUNED_EXACT, (1, 3, 45, 31), 2),  # a 14-channel stem: a GEMM block of 6 + 4 + 4 channels
])
def test_fp16_storage_is_the_fp32_program_with_e1_rounded_to_fp16(library, cfg, shape, threads):
    """The whole network with e1 stored as fp16 (DF1 + head fused, from a NaN-poisoned arena and output) equals,
    bit for bit, the same library run with e1 in fp32 where, after the stem, e1 is rounded to the nearest fp16 by
    numpy: the stem's epilogue rounds to nearest even once, and down2 and DF1 (with its fused head) widen exactly
    those values, at odd widths and heights, 1 and 2 threads, batches 1-3."""
    model = random_gmbinet(cfg, seed=sum(shape) + threads)
    x = np.random.default_rng(11).standard_normal(shape).astype(np.float32)
    half = fused(library, model, threads)
    got = half.forward(x, poison=True)
    assert [n for n, b in half.state(shape[0], *shape[2:])[0].buffers.items() if b.dtype == "float16"] == ["e1"]
    want = fp32_storage_rounded(library, model, threads, x, ["e1"])
    assert not np.isnan(got).any()
    assert np.array_equal(got, want), float(np.abs(got - want).max())


def test_a_half_storage_flag_the_kernel_has_no_path_for_is_refused(library):
    """EkOp.flags are honoured only where a kernel converts: the stem's out, the S2 ops' x and out, the UP ops'
    x, a banded GMBI module's x and out together.  Any other flag (a two-phase GMBI module's, one flag alone on a
    GMBI module, x_half on the stem, out_half on a 1x1 op, an unknown bit) makes ek_run refuse the op before
    running anything."""
    from edgekit.errors import EdgekitError
    from edgekit.kernels.cpu.runtime import EkOp

    X, O = cpu_fused.EK_FLAGS["x_half"], cpu_fused.EK_FLAGS["out_half"]
    fn = fused(library, random_gmbinet(ODD, seed=4), 1)
    plan, acts, ops, layers = fn.state(1, 21, 17)
    at = {names[0]: i for i, names in enumerate(layers)}
    assert ops[at["gmbi2_1"]].u.gmbi.mode == cpu_fused.GMBI_MODES["two-phase"]
    for name, flag in (("gmbi2_1", X | O), ("gmbi2_1", X), ("stem", X), ("decoder5", O), ("stem", 4), ("down2", 8)):
        bad = (EkOp * len(ops))(*ops)
        bad[at[name]].flags |= flag
        with pytest.raises(EdgekitError, match=f"op {at[name]} of the program is invalid"):
            fn.kernels.run(bad)


@pytest.mark.parametrize("threads", [1, 2])
def test_stage_2_ping_pong_buffers_in_fp16_where_its_modules_are_banded(library, monkeypatch, threads):
    """Where stage 2's modules are banded (512 px: 128 rows), its ping-pong buffers are fp16 too (down2 writes,
    the modules read and write, down3 and DF2 read them), and where a module is two-phase they stay fp32; the
    whole network at 2 x 3 x 100 x 45 (stage 2: 25 x 12, banded by the patched threshold) from a NaN-poisoned
    output equals, bit for bit, the fp32-storage program with those three buffers rounded to fp16 after every op
    (the banded modules' epilogue adds the fp16 residual widened exactly and rounds once; the element-wise bounds
    against PyTorch are the op-by-op tests' above, where every module is banded and its buffers fp16)."""
    monkeypatch.setattr(cpu_fused, "GMBI_TWO_PHASE_MAX_ROWS", 20)  # stage 2 banded, stages 3-5 two-phase
    model = random_gmbinet(ODD, seed=31 + threads)
    x = np.random.default_rng(12).standard_normal((2, 3, 100, 45)).astype(np.float32)
    fn = fused(library, model, threads)
    plan, _, ops, layers = fn.state(2, 100, 45)
    assert [n for n, b in plan.buffers.items() if b.dtype == "float16"] == ["e1", "e2a", "e2b"]
    flags = {names[0]: op.flags for op, names in zip(ops, layers)}
    X, O = cpu_fused.EK_FLAGS["x_half"], cpu_fused.EK_FLAGS["out_half"]
    assert flags["stem"] == O and flags["down2"] == X | O and flags["down3"] == X and flags["DF2"] == X
    assert all(flags[n] == X | O for n in flags if n.startswith("gmbi2_"))
    assert not any(flags[n] for n in flags if n.startswith(("gmbi3", "gmbi4", "gmbi5", "down4", "DF3")))
    got = fn.forward(x, poison=True)
    want = fp32_storage_rounded(library, model, threads, x, ["e1", "e2a", "e2b"])
    assert not np.isnan(got).any()
    assert np.array_equal(got, want), float(np.abs(got - want).max())


def test_a_changed_weight_array_is_repacked(library):
    """The bf16 A tiles are packed once per weight array and kept: new weights at the same address (the same
    program, its parameters overwritten) must be packed again, never run from the stale pack."""
    from edgekit.kernels.fold import fold_gmbinet

    m1, m2 = random_gmbinet(ODD, seed=21), random_gmbinet(ODD, seed=22)
    x = np.random.default_rng(8).standard_normal((1, 3, 40, 36)).astype(np.float32)
    fn = fused(library, m1, 1)
    first = fn.forward(x, poison=True)
    blob2, offsets2 = fold_gmbinet(m2, channel_multiple=1).param_layout()
    assert offsets2 == fn.offsets
    fn.params[:] = blob2
    again = fn.forward(x, poison=True)
    fresh = fused(library, m2, 1).forward(x, poison=True)
    assert np.array_equal(again, fresh) and not np.array_equal(again, first)


def test_published_checkpoint_on_real_images_within_the_bf16_parity_budget(library, published_ckpt, sd900):
    """The whole network (DF1 + head fused, output NaN-poisoned) on SD-900 test images against PyTorch fp32,
    held to the budget the parity gate gives a bf16 candidate (what OpenVINO's default gets on an AMX CPU)."""
    from edgekit.models.checkpoint import load_checkpoint
    from edgekit.pipeline.parity import PARITY_BUDGETS
    from test_cpu_fused import _real_batch

    ck = load_checkpoint(published_ckpt)
    model = ck.build().eval()
    x = _real_batch(sd900, ck.preprocess, 2, (256, 320))
    got = fused(library, model, 2).forward(x, poison=True)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()  # probabilities
    budget = PARITY_BUDGETS["bf16"]
    assert not np.isnan(got).any()
    assert float(np.abs(got - ref).mean()) <= budget["mean_abs_diff"]
    decisive = np.abs(ref - 0.5) >= budget["decision_margin"]
    agree = ((got > 0.5) == (ref > 0.5))[decisive].mean()
    assert agree >= budget["decisive_mask_agreement"], agree


def test_the_bf16_level_is_never_chosen_or_built_by_default():
    """avx512amx changes the arithmetic: an fp32 artifact never gets it unless it is the one level asked for."""
    from edgekit.errors import EdgekitError

    everything = {f: True for f in ("AVX2", "FMA3", "AVX512F", "AVX512_SKX", "AVX512FP16", "AMX_TILE", "AMX_BF16")}
    assert ISA in cpu_fused.OPT_IN_ISAS and ISA not in cpu_fused.DEFAULT_ISAS
    assert cpu_fused.choose_isa(["avx512", "avx2", ISA], features=everything) == "avx512"
    assert cpu_fused.choose_isa([ISA], features=everything) == ISA
    with pytest.raises(EdgekitError, match="cannot run"):
        cpu_fused.choose_isa([ISA], features={**everything, "AMX_BF16": False})
    with pytest.raises(EdgekitError, match="cannot run"):  # its GMBI chain runs in fp16 (AVX512-FP16)
        cpu_fused.choose_isa([ISA], features={**everything, "AVX512FP16": False})


def test_compile_precision_bf16_builds_the_amx_library_alone_within_the_bf16_budget(library, published_ckpt, sd900,
                                                                                    tmp_path):
    """compile --precision bf16: the artifact holds only the avx512amx library, the runner runs it, and the parity
    gate held it to the bf16 budget on real SD-900 test images; fp32 with that library is refused in one line."""
    from edgekit.backends.registry import backends
    from edgekit.errors import EdgekitError
    from edgekit.models.checkpoint import load_checkpoint
    from edgekit.pipeline.compile import compile_model
    from edgekit.runtime import load

    backends()  # every backend registered in its own order before one is imported by name (the registry's order)
    from edgekit.backends.cpu_fused.build import build_cpu_fused

    out = tmp_path / "bf16"
    man = compile_model(str(published_ckpt), "cpu-fused", "bf16", str(out), parity_data=str(sd900), threads=2,
                        log=lambda *_: None)
    assert man["precision"] == "bf16" and man["isa"] == [ISA] and list(man["kernels"]["libraries"]) == [ISA]
    assert "budget" in man["parity"] and "test split" in man["parity"]["data"]
    runner = load(str(out))
    assert runner.isa == ISA and runner.kernels.amx_active
    with pytest.raises(EdgekitError, match="precision bf16 only"):
        build_cpu_fused(load_checkpoint(published_ckpt), tmp_path / "x", "fp32", isas=[ISA], log=lambda *_: None)


def test_a_cpu_without_amx_never_gets_a_bf16_candidate_or_row(monkeypatch, tiny_ckpt, tmp_path):
    """--precision auto and bench --all leave cpu-fused bf16 out, with the reason, where the CPU lacks AMX-BF16
    (faked here by what supported_isas reports), and offer it where the CPU has it."""
    from edgekit.bench.plan import default_cpu_backends
    from edgekit.pipeline.auto import plan_candidates
    from edgekit.pipeline.request import CompileRequest

    req = CompileRequest(source=str(tiny_ckpt), target="cpu-fused", precision="auto", out=str(tmp_path / "o"))
    for isas, offered in ((["avx512", "avx2"], False), (["avx512", "avx2", ISA], True)):
        monkeypatch.setattr(cpu_fused, "supported_isas", lambda features=None, isas=isas: list(isas))
        chosen, skipped = plan_candidates(req)
        assert ("bf16" in {c.precision for c in chosen}) is offered
        assert any(s["precision"] == "bf16" and "AMX" in s["reason"] for s in skipped) is not offered
        assert ("cpu-fused:bf16" in default_cpu_backends(all_rows=True)) is offered
