"""benchmarks/cpu_floor.py: the counting rule its per-kernel floors rest on (RESULTS §14.6), and its micro-benchmark
binary.  No timings are asserted: the rates are only checked to be measured at all."""
from __future__ import annotations

import importlib.util
import shutil

import pytest

from conftest import ROOT


def _cpu_floor():
    spec = importlib.util.spec_from_file_location("cpu_floor", ROOT / "benchmarks" / "cpu_floor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_counting_rule_on_the_published_network(published_ckpt):
    from edgekit.kernels.cpu.runtime import build_program
    from edgekit.kernels.fold import fold_gmbinet
    from edgekit.kernels.graph import plan_gmbinet
    from edgekit.models.checkpoint import load_checkpoint

    cf = _cpu_floor()
    net = fold_gmbinet(load_checkpoint(published_ckpt).build().eval(), channel_multiple=1)
    _, offsets = net.param_layout()
    plan = plan_gmbinet(net, 1, 512, 512, "float32", channel_multiple=1)
    _, layers = build_program(plan, offsets, 0, 0, threads=1)  # addresses only: no library is loaded
    work = cf.count_work(plan, offsets, layers)
    g = work["groups"]
    assert list(g) == list(cf.GROUP_ORDER) and not work["int8"]
    macs = sum(w["fma_macs"] + w["gmbi_dw_macs"] + w["pw1x1_macs"] for w in g.values())
    assert macs == 336_748_544  # the 0.337 GMAC
    # the GMBI 1x1s: C x C per pixel, one per module (widths 32..128 at 128..16 px, depths 3, 4, 6, 3)
    sizes = {2: 128, 3: 64, 4: 32, 5: 16}
    expect_1x1 = sum(d * net.widths[s - 1] ** 2 * sizes[s] ** 2 for s, d in zip(range(2, 6), net.depths))
    assert sum(w["pw1x1_macs"] for w in g.values()) == expect_1x1
    assert g["gmbi3"]["pw1x1_macs"] == 4 * 64 * 64 * 64 * 64
    params = lambda layer: sum(nb for k, (_, nb) in offsets.items() if k.split(".")[0] == layer)  # noqa: E731
    # stem: reads the 3-channel fp32 input, writes e1 (16 x 256 x 256 fp32), once each
    assert g["stem"]["bytes"] == 3 * 512 * 512 * 4 + 16 * 256 * 256 * 4 + params("stem")
    # DF1+head is one op: e1 and d2 in, the 512 x 512 probability map out; DF1's own output d1 is never moved
    assert g["DF1+head"]["buffers_read"] == ["e1", "d2"] and g["DF1+head"]["buffers_written"] == ["output"]
    assert g["DF1+head"]["bytes"] == (16 * 256 * 256 + 16 * 128 * 128 + 512 * 512) * 4 + params("DF1") + params("head")
    # a GMBI stage: each module reads its input and writes the other ping-pong buffer, once each
    assert g["gmbi2"]["op_bytes"] == [2 * 32 * 128 * 128 * 4 + params(f"gmbi2_{i}") for i in (1, 2, 3)]


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the micro-benchmarks")
def test_micro_benchmarks_build_and_report_rates(tmp_path):
    from edgekit.kernels.cpu.runtime import cpu_features

    cf = _cpu_floor()
    feats = cpu_features()
    if not all(feats.get(f) for f in ("AVX512F", "AVX512_SKX", "AVX512FP16", "AMX_TILE", "AMX_BF16")):
        pytest.skip("the micro-benchmarks are built for Sapphire Rapids (-march=sapphirerapids: AVX512-FP16, AMX)")
    exe = cf.build(tmp_path)
    r = cf.run_one(exe, "fma_f32", 2, 1000, 0, 2)
    assert r["reps"] == 2 and r["threads"] == 2 and r["min"] > 0
    m = cf.run_one(exe, "copy", 1, 1, 1 << 20, 2)
    assert m["reps"] == 2 and m["min"] > 0
    # the arch_prctl permission and the tile loop run (a refusal would fail the run with its reason)
    assert cf.run_one(exe, "amx_bf16", 1, 100, 0, 1)["min"] > 0
