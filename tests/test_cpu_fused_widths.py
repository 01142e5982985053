"""cpu-fused at any width (issue 20 item 2): every kernel of GMBINets whose stem, decoder and head widths are not
multiples of 4 (the GMBI stages are: the model's 4 equal groups need it), and whose GMBI widths give odd lane
counts, against the PyTorch layers, on BOTH kernel libraries this CPU runs (avx2 and, where it has it, avx512).

Every op runs from a NaN-poisoned arena (and the whole network into a NaN-filled output), so a channel block or a
masked vector tail a kernel forgot to write shows up.  Small odd image sizes, so every GEMM has pixel tails of
1..3 vectors and every output-channel count leaves a remainder block.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit.models.gmbinet import GMBINetConfig

from conftest import kernel_library, random_gmbinet

from edgekit.kernels.cpu import runtime as cpu_fused
from test_cpu_fused import check_every_layer, int8_gmbi_reference  # noqa: E402

# the fp32 levels; the opt-in avx512amx level (bf16 1x1 products) has its own bounds in tests/test_cpu_fused_amx.py
ISAS = list(cpu_fused.DEFAULT_ISAS)


@pytest.fixture(scope="module", params=ISAS)
def library(request, tmp_path_factory) -> Path:
    return kernel_library(request.param, tmp_path_factory)


def fused(library: Path, model, threads: int, fuse_head: bool = True):
    from edgekit.kernels.fold import fold_gmbinet

    net = fold_gmbinet(model, channel_multiple=1)
    blob, offsets = net.param_layout()
    kernels = cpu_fused.CpuKernels(library, threads)
    assert kernels.isa == library.stem.rsplit("_", 1)[1]  # the library this parameter names, not the default
    return cpu_fused.FusedNet(kernels, net, blob, offsets, fuse_head=fuse_head)


# Output-channel counts of the GEMMs: stem/DF2 w0, DF1 the head width, DF3..DF4 and the down blocks the GMBI
# widths; a GMBI module's 1x1 is C x C over G = C/4 lanes.
ODD = GMBINetConfig(widths=(7, 20, 28, 36, 44), depths=(1, 2, 1, 1), head_width=13)      # lanes 5, 7, 9, 11
PRUNED_EXACT = GMBINetConfig(widths=(14, 28, 56, 84, 112), depths=(1, 1, 1, 1))       # prune 0.125 --exact
TINY_ODD = GMBINetConfig(in_channels=5, widths=(1, 4, 12, 4, 8), depths=(1, 1, 1, 1), head_width=2,
                         out_channels=3)                                                 # one-channel blocks
WIDE_ODD = GMBINetConfig(widths=(15, 52, 44, 60, 68), depths=(1, 1, 1, 1), head_width=11)


@pytest.mark.parametrize("cfg,shape,threads", [
    (ODD, (1, 3, 37, 53), 1),
    (ODD, (2, 3, 29, 67), 2),
    (PRUNED_EXACT, (1, 3, 45, 31), 2),
    (TINY_ODD, (3, 5, 23, 19), 1),
    (WIDE_ODD, (1, 3, 50, 41), 2),
])
def test_each_kernel_at_odd_widths_matches_its_torch_layer(library, cfg, shape, threads):
    model = random_gmbinet(cfg, seed=sum(shape) + threads)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    checked = check_every_layer(fused(library, model, threads, fuse_head=False), model, x)
    assert len(checked) == 11 + sum(cfg.depths)  # stem, 4 down, GMBI, decoder5, 4 DF, head: every op compared


@pytest.mark.parametrize("mode", ["banded", "two-phase"])
def test_gmbi_both_task_cuttings_at_odd_lane_counts(library, monkeypatch, mode):
    monkeypatch.setattr(cpu_fused, "GMBI_TWO_PHASE_MAX_ROWS", 0 if mode == "banded" else 10 ** 6)
    model = random_gmbinet(ODD, seed=9)
    x = np.random.default_rng(3).standard_normal((2, 3, 83, 45)).astype(np.float32)
    net = fused(library, model, 2, fuse_head=False)
    _, _, ops, layers = net.state(2, 83, 45)
    assert {o.u.gmbi.mode for o, ly in zip(ops, layers) if ly[0].startswith("gmbi")} == {cpu_fused.GMBI_MODES[mode]}
    assert sum(c.startswith("gmbi") for c in check_every_layer(net, model, x)) == sum(ODD.depths)


@pytest.mark.parametrize("cfg,shape,threads", [(ODD, (2, 3, 37, 53), 2), (TINY_ODD, (1, 5, 31, 27), 1),
                                               (PRUNED_EXACT, (1, 3, 64, 48), 1)])
def test_whole_network_at_odd_widths_into_a_poisoned_output(library, cfg, shape, threads):
    """DF1 + head fused, the output array NaN-filled before the run; against the PyTorch model."""
    model = random_gmbinet(cfg, seed=4)
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    net = fused(library, model, threads)
    assert ["DF1", "head"] in net.state(shape[0], *shape[2:])[3]
    got = net.forward(x, poison=True)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape and not np.isnan(got).any()
    assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.parametrize("mode", ["banded", "two-phase"])
def test_int8_gmbi_1x1_at_odd_lane_counts(library, monkeypatch, mode):
    """The INT8 1x1 (G = 5..11 lane words per pixel, pixel tails through masked loads and stores) against the
    same quantization in float64 on PyTorch's z, from a poisoned arena."""
    from edgekit.kernels.cpu.build import gmbi_1x1_ranges, quantize_gmbi_1x1
    from edgekit.kernels.cpu.runtime import EkOp
    from edgekit.kernels.fold import fold_gmbinet

    monkeypatch.setattr(cpu_fused, "GMBI_TWO_PHASE_MAX_ROWS", 0 if mode == "banded" else 10 ** 6)
    model = random_gmbinet(ODD, seed=12)
    x = np.random.default_rng(6).standard_normal((2, 3, 41, 35)).astype(np.float32)
    net = fold_gmbinet(model, channel_multiple=1)
    quantize_gmbi_1x1(net, gmbi_1x1_ranges(model, [x]))
    blob, offsets = net.param_layout()
    fn = cpu_fused.FusedNet(cpu_fused.CpuKernels(library, 2), net, blob, offsets, fuse_head=False)
    plan, acts, ops, layers = fn.state(2, 41, 35)
    acts.fill(0xFF)
    fn.view(plan, acts, plan.input)[...] = x
    by_layer = {ln.layer: ln for ln in plan.launches}
    checked = 0
    for op, names in zip(ops, layers):
        ln = by_layer[names[0]]
        if ln.kind != "gmbi":
            fn.kernels.run((EkOp * 1)(op))
            continue
        assert op.u.gmbi.pw_q and op.u.gmbi.mode == cpu_fused.GMBI_MODES[mode]  # INT8 1x1, in the mode asked
        io = [v for k, v in ln.args if k == "act"]
        xin = fn.view(plan, acts, io[0]).copy()
        fn.kernels.run((EkOp * 1)(op))
        got = fn.view(plan, acts, io[1])
        assert not np.isnan(got).any(), ln.layer
        ref, flip = int8_gmbi_reference(model, net, ln.layer, xin)
        err = np.abs(got - ref)
        assert (err <= 1e-4 * max(1.0, float(np.abs(ref).max()))).mean() >= 0.999, ln.layer
        assert err.max() <= 4 * flip, (ln.layer, float(err.max()), flip)
        checked += 1
    assert checked == sum(ODD.depths)


def test_cpu_fused_takes_any_width_the_model_allows():
    """The backend asks prune for no multiple (the GMBI stages' multiple of 4 is the model's own rule); the fold for
    the CUDA kernels still refuses a stem width they cannot run."""
    from edgekit.backends.registry import get_backend
    from edgekit.errors import EdgekitError
    from edgekit.kernels.fold import fold_gmbinet

    assert get_backend("cpu-fused").channel_multiple == 1
    model = random_gmbinet(ODD)
    assert fold_gmbinet(model, channel_multiple=1).widths == ODD.widths
    with pytest.raises(EdgekitError, match="divisible by 4"):
        fold_gmbinet(model)
    with pytest.raises(Exception, match="not divisible by the 4 GMBI groups"):
        GMBINetConfig(widths=(8, 18, 24, 32, 40))
