"""Journey (issue 19): a checkpoint -> fp32 artifact -> INT8 under an accuracy budget -> bench of both side by side.

The user's steps through the CLI in a fresh folder: `compile` the fp32 OpenVINO artifact, `quantize` to INT8
with --calib, --val and --max-drop (NNCF's accuracy control), then `bench` the two artifacts on the same
images. Each hand-off is checked: the INT8 artifact records the budget it met (before, after, drop <= max-drop,
on the --val images), both name the same checkpoint, and bench measures, on those same images, the IoU the
quantizer recorded (fp32 = before, int8 = after) and times both rows.

Small on purpose: the tiny 64x64 checkpoint (its IoU means nothing; what is checked is that every command
reads what the one before wrote), 8 synthetic images for calibration, validation and bench, 1 round.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from journey_cli import edgekit

pytestmark = pytest.mark.slow
pytest.importorskip("openvino", reason="openvino not installed (pip install 'edgekit[cpu]')")
pytest.importorskip("nncf", reason="nncf not installed (pip install 'edgekit[cpu]')")

MAX_DROP = 0.02


def test_quantize_with_a_budget_then_bench_int8_beside_fp32(tmp_path, tiny_ckpt):
    work = tmp_path / "journey"
    work.mkdir()
    shutil.copy(tiny_ckpt, work / "model.pt")
    sha = hashlib.sha256((work / "model.pt").read_bytes()).hexdigest()
    edgekit(work, "synth", "--out", "data", "-n", "8")

    edgekit(work, "compile", "model.pt", "--target", "openvino", "--out", "fp32")
    edgekit(work, "quantize", "model.pt", "--target", "openvino", "--calib", "data", "--val", "data",
            "--max-drop", MAX_DROP, "--out", "int8")

    # hand-off 1: the INT8 artifact is INT8, from the same checkpoint, and records the budget it met
    fp32 = json.loads((work / "fp32" / "manifest.json").read_text())
    int8 = json.loads((work / "int8" / "manifest.json").read_text())
    assert (fp32["precision"], int8["precision"]) == ("fp32", "int8")
    assert fp32["source"]["sha256"] == int8["source"]["sha256"] == sha
    q = int8["quantization"]
    assert q["accuracy_control"] and q["max_drop"] == MAX_DROP and q["metric"] == "iou"
    assert q["drop"] == pytest.approx(q["before"] - q["after"]) and q["drop"] <= MAX_DROP
    assert q["calibration_images"] == 8 and "8 images" in q["validation"]

    # hand-off 2: bench takes both artifacts and measures, on the --val images, what quantize recorded
    r = edgekit(work, "bench", "fp32", "int8", "--data", "data", "--limit", 8, "--rounds", 1, "--iters", 3,
                "--batch", 1, "--json", timeout=300)
    rows = {row["precision"]: row for row in json.loads(r.stdout)["rows"] if row.get("precision") in ("fp32", "int8")}
    assert set(rows) == {"fp32", "int8"}, rows
    assert rows["fp32"]["iou"] == pytest.approx(q["before"], abs=1e-3)
    assert rows["int8"]["iou"] == pytest.approx(q["after"], abs=1e-3)
    assert rows["fp32"]["iou"] - rows["int8"]["iou"] <= MAX_DROP + 1e-3
    for row in rows.values():
        assert row["fps_b1"] > 0 and row["size_bytes"] > 0, row
