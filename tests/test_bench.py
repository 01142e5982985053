"""``edgekit bench --device cpu``: spread over rounds, within-noise ratios, p99 only from enough samples,
the precision OpenVINO actually ran, the CPU/ISA record, what data each accuracy figure is on, and
``--json -`` giving one JSON document on stdout. Real backends at tiny sizes (64x64 random GMBINet)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.bench.cpu import (MIN_P99_SAMPLES, PAPER_ROW, cpu_record, format_latency, format_precision,
                               format_speedup, latency_percentiles, ratio_with_spread, spread)
from edgekit.pipeline.compile import compile_model

from conftest import ROOT, one_error_line

pytest.importorskip("openvino", reason="openvino not installed (pip install 'edgekit[cpu]')")
pytest.importorskip("nncf", reason="nncf not installed (pip install 'edgekit[cpu]')")


@pytest.fixture(scope="module")
def ov_artifacts(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("ov")
    out = {}
    for precision in ("default", "bf16", "int8"):
        out[precision] = root / f"ov_{precision}"
        compile_model(str(tiny_ckpt), "openvino", precision, str(out[precision]), parity_data="synthetic:2",
                      calib="synthetic:8", subset=8, log=lambda *_: None)
    return out


def bench_json(cli, tmp_path, *args):
    r = cli("bench", *args, "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.stderr
    return json.loads((tmp_path / "b.json").read_text()), r


# --- pure functions -------------------------------------------------------------------------------------

def test_ratio_within_noise_marking():
    faster = ratio_with_spread([110.0, 120.0, 115.0], [100.0, 100.0, 100.0])
    assert faster["ratio"] == pytest.approx(1.15) and faster["low"] == pytest.approx(1.1)
    assert faster["high"] == pytest.approx(1.2) and faster["within_noise"] is False
    # Paired by round: the machine slowed down in round 2 for both rows, the ratio stays clear of 1.0.
    drift = ratio_with_spread([120.0, 60.0, 118.0], [100.0, 50.0, 100.0])
    assert drift["within_noise"] is False and drift["low"] == pytest.approx(1.18)
    noisy = ratio_with_spread([95.0, 108.0, 101.0], [100.0, 100.0, 100.0])
    assert noisy["within_noise"] is True and noisy["low"] < 1.0 < noisy["high"]
    slower = ratio_with_spread([80.0, 85.0], [100.0, 100.0])
    assert slower["within_noise"] is False and slower["high"] == pytest.approx(0.85)
    assert ratio_with_spread([120.0], [100.0])["within_noise"] is None  # one round: nothing to judge by
    with pytest.raises(ValueError):
        ratio_with_spread([1.0, 2.0], [1.0])
    row = {"speedup_vs_baseline": noisy["ratio"], "speedup_spread": {k: v for k, v in noisy.items() if k != "ratio"}}
    assert format_speedup(row) == "1.01x (0.95-1.08) within noise"
    row = {"speedup_vs_baseline": faster["ratio"], "speedup_spread": {k: v for k, v in faster.items() if k != "ratio"}}
    assert format_speedup(row) == "1.15x (1.10-1.20)"
    assert format_speedup({"speedup_vs_baseline": 1.0, "speedup_spread": {"baseline": True}}) == "baseline"


def test_p99_only_from_enough_samples():
    few = latency_percentiles([0.001 * (i + 1) for i in range(MIN_P99_SAMPLES - 1)])
    assert few["p99"] is None and few["samples"] == MIN_P99_SAMPLES - 1 and "needs 100" in few["p99_note"]
    assert format_latency(few).endswith(f"/- (n={MIN_P99_SAMPLES - 1})")
    enough = latency_percentiles([0.001 * (i + 1) for i in range(MIN_P99_SAMPLES)])
    assert enough["p50"] <= enough["p90"] <= enough["p99"] <= 100.0 and "p99_note" not in enough
    s = spread([3.0, 1.0, 2.0])
    assert (s["min"], s["median"], s["max"], s["rounds"]) == (1.0, 2.0, 3.0, 3)


def test_cpu_record_reads_model_and_isa_flags():
    x86 = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
           "flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n\n"
           "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    rec = cpu_record(x86)
    assert rec["cpu"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"} <= set(rec["isa"])
    assert "avx512_fp16" in rec["isa_absent"] and "fpu" not in rec["isa"]
    zen3 = "model name\t: AMD EPYC 7R13\nflags\t\t: sse4_2 avx avx2 fma f16c\n"
    rec = cpu_record(zen3)
    assert rec["isa"] == ["sse4_2", "avx", "avx2", "fma", "f16c"]
    assert {"avx512f", "avx512_bf16", "amx_bf16"} <= set(rec["isa_absent"])
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp sve i8mm bf16\nCPU part\t: 0xd40\n"
    assert cpu_record(arm)["isa"] == ["asimd", "asimddp", "sve", "i8mm", "bf16"]


# --- real backends ---------------------------------------------------------------------------------------

def test_openvino_precision_read_back(ov_artifacts):
    import openvino as ov

    from edgekit import runtime

    native_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    ran = runtime.load(ov_artifacts["bf16"], threads=1).executed_precision()
    assert ran["label"] == ("bf16" if native_bf16 else "f32")
    assert ran["inference_precision_hint"] == ("bf16" if native_bf16 else "f32")
    cell = format_precision({"precision": "bf16", "executed_precision": ran})
    assert cell == ("bf16" if native_bf16 else "bf16 (ran f32)")
    q = runtime.load(ov_artifacts["int8"], threads=1).executed_precision()
    int8 = sum(n for p, n in q["compute_layers"].items() if p in ("u8", "i8"))
    assert 0 < int8 < sum(q["compute_layers"].values())  # pointwise scheme: the 1x1 convs only
    assert format_precision({"precision": "int8", "executed_precision": q}).startswith(f"int8 ({int8}/")


def test_bench_rows_report_spread_precision_and_machine(cli, tiny_ckpt, ov_artifacts, tmp_path):
    d, r = bench_json(cli, tmp_path, tiny_ckpt, ov_artifacts["default"], ov_artifacts["bf16"], "--backends",
                      "torch", "--batch", "1,2", "--rounds", "3", "--iters", "4", "--data", "synthetic:3",
                      "--settle-time", "0")  # exactly 3 rounds, busy machine or not
    rows = {row["name"].split(" ")[0]: row for row in d["rows"]}
    assert d["baseline"] == rows["openvino:default"]["name"]
    for row in d["rows"]:
        s = row["fps_b1_spread"]
        assert s["rounds"] == 3 and len(s["per_round"]) == 3 and 0 < s["min"] <= s["median"] <= s["max"]
        assert row["latency_ms"]["samples"] == 12 and row["latency_ms"]["p99"] is None  # 12 < 100 samples
    base = rows["openvino:default"]
    assert base["speedup_vs_baseline"] == 1.0 and base["speedup_spread"] == {"baseline": True}
    for name in ("torch", "openvino:bf16"):
        sp = rows[name]["speedup_spread"]
        assert sp["rounds"] == 3 and sp["low"] <= rows[name]["speedup_vs_baseline"] <= sp["high"]
        assert sp["within_noise"] == (sp["low"] <= 1.0 <= sp["high"])
    assert rows["torch"]["executed_precision"] is None  # nothing to read back: fp32 as declared
    assert rows["openvino:bf16"]["executed_precision"]["label"] in ("bf16", "f32")
    # CPU model and ISA flags: in the JSON, as /proc/cpuinfo has them, and in the table's caption.
    m = d["machine"]
    assert m["cpu"] and m["logical_cpus"] >= 1 and isinstance(m["isa"], list)
    if Path("/proc/cpuinfo").is_file():
        flags = set(next(l for l in Path("/proc/cpuinfo").read_text().splitlines()
                         if l.startswith(("flags", "Features"))).split(":", 1)[1].split())
        assert set(m["isa"]) <= flags and not set(m["isa_absent"]) & flags
        flat = " ".join(r.stdout.split())  # the table wraps long cells and caption lines
        assert m["cpu"] in flat and "ISA " + " ".join(m["isa"]) in flat
    flat = " ".join(r.stdout.split())
    assert "p99 only from >= 100 samples" in flat and "(n=12)" in flat
    # the bf16 row says what ran: plain "bf16" where the CPU has native bf16 (AVX512-BF16/AMX), else "bf16 (ran f32)"
    import openvino as ov

    native_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert ("bf16" in flat) if native_bf16 else ("bf16 (ran" in flat)


def test_bench_names_the_data_of_each_accuracy_figure(cli, tiny_ckpt, tmp_path):
    d, r = bench_json(cli, tmp_path, tiny_ckpt, "--backends", "torch", "--rounds", "1", "--iters", "1",
                      "--batch", "1", "--data", "synthetic:6", "--limit", "4")
    scope = d["rows"][0]["accuracy_data"]
    assert scope == d["accuracy_data"] and d["eval_images"] == 4
    assert (scope["dataset"], scope["split"], scope["images"], scope["available"]) == \
        ("synthetic steel defects", "test seed", 4, 6)
    assert d["data"] == "synthetic steel defects test seed, 4 of 6 images (round-robin over the classes)"
    flat = " ".join(r.stdout.split())
    assert d["data"] in flat
    # synthetic images: no paper row beside them (its figures are on SD-900; see test_bench_honest.py)
    assert d["reference"] is None and "arXiv 2508.16397's own figures" not in flat


def test_bench_limit_on_sd900_says_how_many_test_images(cli, tiny_ckpt, sd900, tmp_path):
    d, r = bench_json(cli, tmp_path, tiny_ckpt, "--backends", "torch", "--rounds", "1", "--iters", "1",
                      "--batch", "1", "--data", sd900, "--eval-limit", "30")
    scope = d["rows"][0]["accuracy_data"]
    assert (scope["dataset"], scope["split"], scope["images"], scope["available"], scope["synthetic"]) == \
        ("SD-Saliency-900", "test", 30, 225, False)
    assert d["data"].startswith("SD-Saliency-900 test split, 30 of 225 images") and "(225 images)" not in d["data"]
    assert "(225 images)" not in r.stdout and "30 of 225 images" in " ".join(r.stdout.split())
    ref = d["reference"]  # the paper's row, beside SD-900 only
    assert ref["accuracy_data"]["split"].startswith("the authors' own split") and ref["name"] == PAPER_ROW["name"]
    assert "arXiv 2508.16397's own figures, on the authors' SD-900 split" in " ".join(r.stdout.split())


def test_bench_all_and_backends_are_exclusive(cli, tiny_ckpt):
    assert "--all and --backends" in one_error_line(cli("bench", tiny_ckpt, "--all", "--backends", "torch"))


def test_bench_all_is_every_cpu_backend_and_precision():
    from edgekit.backends.registry import backends
    from edgekit.bench.plan import default_cpu_backends

    every = default_cpu_backends(all_rows=True)
    assert set(default_cpu_backends()) < set(every) and "torch" in every
    for b in backends():
        if b.device == "cpu" and b.build is not None and "gmbinet" in b.kinds:
            here = [p for p in b.precisions if not (b.precision_not_here and b.precision_not_here(p))]
            assert {f"{b.name}:{p}" for p in here} <= set(every)


def test_bench_json_dash_is_one_document_on_stdout(tiny_ckpt, tmp_path):
    """The default rows (one of them INT8, so NNCF runs) in a real process: stdout parses as one JSON
    document, the stage lines and the table are on stderr."""
    from edgekit.bench.plan import default_cpu_backends

    env = {**os.environ, "EDGEKIT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "edgekit.cli", "bench", str(tiny_ckpt), "--rounds", "1",
                           "--iters", "1", "--batch", "1", "--data", "synthetic:3", "--json", "-"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)  # the whole of stdout, nothing before or after the document
    rows = default_cpu_backends()
    assert [row["name"] for row in d["rows"]] == rows and "openvino:int8" in rows  # NNCF ran
    assert d["baseline"] == "openvino:default" and d["command"].endswith("--json -")
    built = [r for r in rows if ":" in r]
    assert f"bench: artifact {len(built)}/{len(built)}: {built[-1]}" in proc.stderr
    assert f"bench: timing {len(rows)} row(s)" in proc.stderr and "bench: timing round 1/1" in proc.stderr
    assert "edgekit bench --device cpu" in proc.stderr  # the table, on stderr
    assert not list(tmp_path.glob("*.png"))  # no plot unless --plot when the JSON goes to stdout
