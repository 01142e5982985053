"""``edgekit bench`` claims only what it measured (issue 19, "the main job"): accuracy on synthetic images is
agreement with the PyTorch model (the paper's SD-900 row only beside SD-900), a busy machine is said and
given time to settle, ``--baseline ROW`` gives ratios for artifacts alone, and the command passes one
frozen ``BenchRequest`` down. Real backends at tiny sizes (64x64 random GMBINet), 1-2 rounds."""
import dataclasses
import inspect
import json

import numpy as np
import pytest

from edgekit.bench.agreement import Reference, agreement, format_agreement, image_agreement, reference_for
from edgekit.bench.busy import LOAD_MARGIN, SPREAD_SETTLED, judge_machine, relative_spread

from conftest import one_error_line

pytest.importorskip("openvino", reason="openvino not installed (pip install 'edgekit[cpu]')")

QUICK = ("--rounds", "1", "--iters", "1", "--batch", "1", "--settle-time", "0")


@pytest.fixture(scope="module")
def ov_pair(tiny_ckpt, tmp_path_factory):
    """Two OpenVINO artifacts of the tiny checkpoint, fp32 and the plugin default, given without it."""
    from edgekit.pipeline.compile import compile_model

    root = tmp_path_factory.mktemp("ovpair")
    out = {}
    for precision in ("fp32", "default"):
        out[precision] = root / f"ov_{precision}"
        compile_model(str(tiny_ckpt), "openvino", precision, str(out[precision]), parity_data="synthetic:2",
                      log=lambda *_: None)
    return out


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))


# --- the busy-machine rule: figures in, verdict out ------------------------------------------------------

def test_busy_rule_from_load_and_round_spread():
    steady = [[100.0, 102.0, 99.0], [50.0, 51.0, 50.5]]
    quiet = judge_machine(1.9, 2, 2, steady)  # the bench's own 2 threads on 2 CPUs
    assert not quiet.busy and quiet.round_spread < SPREAD_SETTLED
    loaded = judge_machine(2.0 + LOAD_MARGIN + 0.1, 2, 2, steady)  # one more runnable task than the cores hold
    assert loaded.busy and loaded.by_load and not loaded.by_spread
    assert "load average 2.6 on 2 CPUs" in loaded.reasons()
    assert not judge_machine(10.0, 16, 2, steady).busy  # others fit on the 14 cores the bench leaves free
    assert judge_machine(10.0, 8, 2, steady).by_load
    jumpy = [[100.0, 140.0, 95.0], [50.0, 70.0, 48.0]]  # every row's rounds disagree by ~45%
    spread = judge_machine(0.5, 2, 2, jumpy)
    assert spread.busy and spread.by_spread and not spread.by_load and spread.round_spread > SPREAD_SETTLED
    assert "rounds differ by" in spread.reasons()
    one_jittery = steady + [[10.0, 30.0, 12.0]]  # the median row decides: one jittery row is not the machine
    assert not judge_machine(0.5, 2, 2, one_jittery).busy
    one_round = judge_machine(None, 2, 2, [[100.0], [50.0]])  # no load figure, no spread: nothing to say
    assert not one_round.busy and one_round.round_spread is None
    assert relative_spread([100.0]) is None and relative_spread([90.0, 110.0, 100.0]) == pytest.approx(0.2)
    assert judge_machine(3.0, 2, 2, jumpy).to_json()["rule"].startswith("busy when the 1-minute load average")


def _torch_rows(tiny_ckpt, n=2):
    from edgekit import runtime
    from edgekit.bench.cpu import Row

    return [Row(f"torch{i}", runtime.load(tiny_ckpt, threads=1), 1) for i in range(n)]


def _timed(rows, rounds, iters):
    from edgekit.eval.timing import time_rows

    time_rows(rows, [1], rounds, iters, warmup=1, show_progress=False)
    return rows


def test_busy_machine_times_more_rounds_until_the_spread_settles(tiny_ckpt):
    """Spread injected as data (the real rounds run, the judge sees a jumpy machine twice, then a steady one):
    one busy line, more rounds, the last --rounds kept."""
    from edgekit.bench.cpu import settle_rounds

    rows = _timed(_torch_rows(tiny_ckpt), rounds=2, iters=2)
    seen = iter([[[100.0, 150.0]] * 2, [[100.0, 150.0]] * 2, [[100.0, 101.0]] * 2])
    lines = []
    judge = lambda load1, cpus, threads, fps: judge_machine(load1, cpus, threads, next(seen))  # noqa: E731
    rec = settle_rounds(rows, [1], rounds=2, iters=2, threads=1, settle_s=30, log=lines.append, judge=judge,
                        load=lambda: [0.1, 0.1, 0.1])
    assert rec["busy"] and rec["settled"] is True and rec["extra_rounds"] == 2 and rec["rounds_timed"] == 4
    assert rec["at_start"]["by_spread"] and not rec["at_start"]["by_load"]
    busy = [l for l in lines if l.startswith("machine busy")]
    assert len(busy) == 1 and "up to 30 s" in busy[0] and "rounds differ by 40%" in busy[0]
    assert any(l.startswith("spread settled at 1% after 2 more round(s)") for l in lines)
    for r in rows:  # the last 2 rounds kept, their calls only
        assert len(r.rounds[1]) == 2 and len(r.lat[1]) == 4


def test_busy_machine_settling_is_bounded_by_the_time_limit(tiny_ckpt):
    from edgekit.bench.cpu import settle_rounds

    rows = _timed(_torch_rows(tiny_ckpt, 1), rounds=2, iters=1)
    now = [0.0]

    def clock():  # every reading 2 s later: each extra round "takes" 4 s of the 10 s allowed
        now[0] += 2.0
        return now[0]

    lines = []
    judge = lambda load1, cpus, threads, fps: judge_machine(9.0, 2, 2, [[100.0, 160.0]])  # noqa: E731 - never settles
    rec = settle_rounds(rows, [1], rounds=2, iters=1, threads=1, settle_s=10, log=lines.append, judge=judge,
                        clock=clock)
    assert rec["busy"] and rec["settled"] is False and 1 <= rec["extra_rounds"] <= 3
    assert rec["rounds_kept"] == rec["rounds_timed"] == 2 + rec["extra_rounds"]  # all kept: the spread shows
    assert len(rows[0].rounds[1]) == rec["rounds_kept"]
    assert lines[0].startswith("machine busy: load average 9.0 on 2 CPUs") and "still unsettled" in lines[-1]
    # --settle-time 0: the warning, no extra round
    lines.clear()
    rec = settle_rounds(rows, [1], rounds=2, iters=1, threads=1, settle_s=0, log=lines.append, judge=judge)
    assert rec["extra_rounds"] == 0 and len(lines) == 1 and "--settle-time 0: no extra rounds" in lines[0]


# --- agreement with the PyTorch model ---------------------------------------------------------------------

def test_agreement_figures_of_two_probability_maps():
    ref = np.zeros((4, 4), np.float32)
    ref[:2, :2] = 0.9  # 4 defect pixels
    same = agreement([ref], [ref])
    assert same == {"mask_iou": 1.0, "pixel_agreement": 1.0, "max_abs_prob_diff": 0.0, "mean_abs_prob_diff": 0.0,
                    "images": 1}
    other = ref.copy()
    other[0, 0] = 0.2  # one defect pixel lost (diff 0.7), one gained at 0.6
    other[3, 3] = 0.6
    iou, pixels, max_diff, _ = image_agreement(other, ref)
    assert iou == pytest.approx(3 / 5) and pixels == pytest.approx(14 / 16) and max_diff == pytest.approx(0.7)
    empty = np.zeros((4, 4), np.float32)
    assert image_agreement(empty, empty + 0.1)[0] == 1.0  # both masks empty: they agree
    two = agreement([ref, other], [ref, ref])
    assert two["mask_iou"] == pytest.approx(0.8) and two["images"] == 2
    assert format_agreement(two) == "0.8000 / 93.75% / 0.700" and format_agreement(None) == "-"
    assert format_agreement(two, is_reference=True) == "reference"


def test_reference_of_an_artifact_is_its_source_checkpoint(tiny_ckpt, ov_pair, tmp_path):
    import shutil

    assert reference_for(ov_pair["fp32"]) == Reference(tiny_ckpt)
    assert reference_for(tiny_ckpt) == Reference(tiny_ckpt)
    assert reference_for(None).checkpoint is None
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")
    assert "plain model file" in reference_for(onnx).note
    moved = tmp_path / "elsewhere.pt"  # an artifact whose checkpoint has changed since it was compiled
    shutil.copy(tiny_ckpt, moved)
    art = tmp_path / "art"
    shutil.copytree(ov_pair["fp32"], art)
    man = json.loads((art / "manifest.json").read_text())
    man["source"]["path"] = str(moved)
    (art / "manifest.json").write_text(json.dumps(man))
    moved.write_bytes(moved.read_bytes() + b"x")
    assert reference_for(art).checkpoint is None and "has changed" in reference_for(art).note


# --- the command, end to end --------------------------------------------------------------------------------

def test_bench_on_synthetic_shows_agreement_with_pytorch_not_an_iou_beside_the_paper(cli, tiny_ckpt, cache):
    r = cli("bench", tiny_ckpt, "--backends", "torch,openvino:fp32", "--data", "synthetic:3", "--rounds", "2",
            "--iters", "2", "--batch", "1", "--settle-time", "0", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["reference"] is None and d["accuracy_shown"] == "agreement with PyTorch"
    torch_row, ov = d["rows"]
    assert torch_row["agreement_reference"] == {"checkpoint": str(tiny_ckpt), "is_reference": True}
    a = ov["agreement_vs_torch"]
    assert a["images"] == 3 and a["mask_iou"] > 0.99 and a["max_abs_prob_diff"] < 1e-3  # fp32: what torch computes
    assert ov["agreement_reference"] == {"checkpoint": str(tiny_ckpt), "is_reference": False}
    table = " ".join(r.stderr.split())  # with --json the table is on stderr
    assert "vs PyTorch" in table and "reference" in table  # (the header cell wraps over lines)
    assert "paper" not in table and "0.8728" not in table and "IoU/MAE of the measured rows" not in table
    assert "MAE" not in table  # no IoU/MAE columns: the generator's masks are not the product's
    # the machine's state is in the JSON; when busy, one line on stderr says so
    ms = d["machine_state"]
    assert set(ms) >= {"busy", "by_load", "by_spread", "load_average_1min", "round_spread", "rule"}
    busy_lines = [l for l in r.stderr.splitlines() if l.startswith("bench: machine busy")]
    assert len(busy_lines) == (1 if ms["busy"] else 0)
    if ms["busy"]:
        assert "MACHINE BUSY" in table


def _bench_real(cli, ckpt, data):
    r = cli("bench", ckpt, "--backends", "torch", "--data", data, "--eval-limit", "2", *QUICK, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["accuracy_shown"] == "ground truth and agreement with PyTorch"
    table = " ".join(r.stderr.split())
    assert "IoU/MAE of the measured rows" in table and "MAE" in table
    return d, table


def test_bench_own_masks_show_iou_without_the_paper_row(cli, tiny_ckpt, tmp_path, cache):
    from PIL import Image

    own = tmp_path / "own"
    (own / "images").mkdir(parents=True)
    (own / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(own / "images" / f"x{i}.png")
        Image.fromarray(((rng.random((40, 50)) > 0.8) * 255).astype(np.uint8)).save(own / "masks" / f"x{i}.png")
    d, table = _bench_real(cli, tiny_ckpt, own)
    assert d["reference"] is None and "0.8728" not in table and "paper" not in table


def test_bench_paper_row_only_beside_sd900(cli, tiny_ckpt, sd900, cache):
    d, table = _bench_real(cli, tiny_ckpt, sd900)
    assert d["reference"]["iou"] == 0.8728 and "0.8728" in table and "arXiv 2508.16397's own figures" in table


def test_bench_baseline_row_with_artifacts_alone(cli, ov_pair, tmp_path):
    out = tmp_path / "b.json"
    r = cli("bench", ov_pair["fp32"], ov_pair["default"], "--baseline", "ov_fp32", "--data", "synthetic:2",
            *QUICK[:-2], "--rounds", "2", "--settle-time", "0", "--out", out)
    assert r.exit_code == 0, r.stderr
    d = json.loads(out.read_text())
    fp32, default = d["rows"]
    assert d["baseline"] == fp32["name"] == "openvino:fp32 (ov_fp32)"
    assert fp32["speedup_vs_baseline"] == 1.0 and default["speedup_spread"]["rounds"] == 2
    assert default["speedup_vs_baseline"] > 0
    # no checkpoint given: the agreement is with the checkpoint the manifests name
    assert default["agreement_vs_torch"]["images"] == 2 and fp32["agreement_vs_torch"]["mask_iou"] > 0.99
    flat = " ".join(r.stdout.split())
    assert "baseline = openvino:fp32 (ov_fp32): --baseline" in flat and "ONNX -> OpenVINO" not in flat
    # the part before "(...)" names a row too
    r = cli("bench", ov_pair["fp32"], ov_pair["default"], "--baseline", "openvino:default", "--data", "synthetic:1",
            *QUICK, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["baseline"] == "openvino:default (ov_default)"


def test_bench_bad_baseline_is_one_error_line(cli, ov_pair, tmp_path, cache):
    out = tmp_path / "b.json"
    r = cli("bench", ov_pair["fp32"], "--baseline", "tensorrt", "--out", out, *QUICK)
    line = one_error_line(r)
    assert r.exit_code == 2 and "--baseline tensorrt is not a row of this bench" in line
    assert "openvino:fp32 (ov_fp32)" in line and not out.exists()


def test_bench_request_is_built_once_and_passed_down(tiny_ckpt, cache):
    from edgekit.bench.request import BenchRequest
    from edgekit.bench.run import bench_cpu
    from edgekit.commands import deploy

    req = BenchRequest(models=(str(tiny_ckpt),), backends=("torch",), batches=(1,), rounds=1, iters=1,
                       data="synthetic:2", settle_s=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.rounds = 3
    result = bench_cpu(req)
    assert [r["name"] for r in result["rows"]] == ["torch"] and result["settings"]["rounds"] == 1
    assert len(inspect.signature(deploy._bench).parameters) <= 5  # was 18 positional arguments
