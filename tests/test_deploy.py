"""compile / quantize / runtime / bench: parity with the source model, manifests, refusals."""
import json

import numpy as np
import pytest

from edgekit import runtime
from edgekit.errors import EdgekitError
from edgekit.artifact import read_manifest
from edgekit.pipeline.compile import compile_model

from conftest import one_error_line

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'edgekit[cpu]')")
pytest.importorskip("openvino", reason="openvino not installed (pip install 'edgekit[cpu]')")


@pytest.fixture(scope="module")
def artifacts(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("art")
    out = {}
    for target, precision in (("onnx", "fp32"), ("ort", "fp32"), ("openvino", "fp32")):
        out[target] = root / target
        compile_model(str(tiny_ckpt), target, precision, str(out[target]), parity_data="synthetic:4",
                      log=lambda *_: None)
    return out


@pytest.mark.parametrize("target", ["onnx", "ort", "openvino"])
def test_artifact_matches_torch(artifacts, tiny_ckpt, target):
    man = read_manifest(artifacts[target])
    assert man["target"] == target and man["precision"] == "fp32"
    assert man["parity"]["max_abs_diff"] < 1e-4 and man["parity"]["mask_iou_agreement"] > 0.99
    assert len(man["source"]["sha256"]) == 64
    assert man["model"]["kind"] == "gmbinet" and man["model"]["config"]["widths"] == [8, 16, 16, 24, 32]
    assert man["preprocess"]["input_size"] == [64, 64] and man["input"]["layout"] == "NCHW"
    assert {"torch", "onnx", "edgekit"} <= set(man["tools"])
    assert set(man["files"]) >= {man["model_file"]} and man["size_bytes"] > 0
    # The runner interface is the same for every backend, torch included.
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    art, ref = runtime.load(artifacts[target]), runtime.load(tiny_ckpt)
    assert art.input_shape == ref.input_shape == (3, 64, 64)
    art.warmup()
    ya, yr = art.infer(x), ref.infer(x)
    assert ya.shape == yr.shape == (2, 1, 64, 64) and ya.dtype == np.float32
    assert np.abs(ya - yr).max() < 1e-4


def test_published_artifact_parity_on_real_images(published_ckpt, sd900, tmp_path):
    man = compile_model(str(published_ckpt), "onnx", "fp32", str(tmp_path / "a"), parity_data=str(sd900),
                        log=lambda *_: None)
    assert man["parity"]["images"] == 16 and "SD-Saliency-900" in man["parity"]["data"]
    assert man["parity"]["max_abs_diff"] < 1e-3 and man["parity"]["min_mask_iou_agreement"] > 0.99


def test_eval_and_predict_take_artifacts(cli, artifacts, tmp_path):
    r = cli("eval", artifacts["openvino"], "--data", "synthetic:3", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["model"].startswith("openvino fp32")


def test_corrupt_artifact_refused(artifacts, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(artifacts["onnx"], bad)
    with open(bad / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EdgekitError, match="does not match its sha256"):
        runtime.load(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(EdgekitError, match="corrupt manifest"):
        runtime.load(bad)




def test_unknown_target_and_precision(cli, tiny_ckpt, tmp_path):
    assert "unknown target 'tflite'" in one_error_line(cli("compile", tiny_ckpt, "--target", "tflite", "--out", tmp_path / "o"))
    assert "does not offer precision bf16" in one_error_line(
        cli("compile", tiny_ckpt, "--target", "onnx", "--precision", "bf16", "--out", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_missing_backend_names_package(cli, tiny_ckpt, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else real(n, *a))
    line = one_error_line(cli("compile", tiny_ckpt, "--target", "openvino", "--out", tmp_path / "o"))
    assert "pip install openvino" in line
    line = one_error_line(cli("compile", tiny_ckpt, "--target", "trt", "--precision", "fp16", "--out", tmp_path / "o"))
    assert "pip install tensorrt" in line


def test_existing_output_kept(cli, tiny_ckpt, artifacts):
    before = (artifacts["onnx"] / "manifest.json").read_text()
    assert "already exists" in one_error_line(cli("compile", tiny_ckpt, "--target", "onnx", "--out", artifacts["onnx"]))
    assert (artifacts["onnx"] / "manifest.json").read_text() == before


def test_empty_calibration_folder(cli, tiny_ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    line = one_error_line(cli("quantize", tiny_ckpt, "--target", "openvino", "--calib", tmp_path / "empty",
                               "--out", tmp_path / "q"))
    assert "no images" in line and not (tmp_path / "q").exists()


@pytest.mark.parametrize("target", ["openvino", "onnx"])
def test_int8_artifact(tiny_ckpt, tmp_path, target):
    man = compile_model(str(tiny_ckpt), target, "int8", str(tmp_path / "q"), calib="synthetic:8", subset=8,
                        parity_data="synthetic:4", val="synthetic:4", log=lambda *_: None)
    q = man["quantization"]
    assert q["tool"] == "nncf" and q["calibration_images"] == 8 and q["scheme"] == "pointwise"
    assert {"before", "after", "drop"} <= set(q)
    assert man["parity"]["max_abs_diff"] < 0.5  # quantized, but still the same model
    runner = runtime.load(tmp_path / "q")
    assert runner.precision == "int8"
    assert runner.infer(np.zeros((1, 3, 64, 64), np.float32)).shape == (1, 1, 64, 64)


@pytest.mark.parametrize("command", ["quantize", "compile"])
def test_quantize_refuses_over_budget(cli, tiny_ckpt, tmp_path, monkeypatch, command):
    """A quantized model that loses more than --max-drop is refused and nothing is written, by
    `quantize` and by `compile --precision int8` alike (the pipeline's one INT8 budget check)."""
    import edgekit.compress.quantize as quant

    def broken(model, backend, calibration, **kw):  # stands in for a quantizer that ruins the model
        import openvino as ov
        from openvino import opset13 as ops

        image = ops.parameter(ov.PartialShape([-1, 3, 64, 64]), ov.Type.f32, name="image")
        mean = ops.reduce_mean(image, np.array([1], np.int64), keep_dims=True)
        ones = ops.add(ops.multiply(mean, np.float32(0.0)), np.float32(1.0))  # "defect" everywhere
        return ov.Model([ones], [image])

    monkeypatch.setattr(quant, "quantize_model", broken)
    args = ["--precision", "int8"] if command == "compile" else []
    line = one_error_line(cli(command, tiny_ckpt, "--target", "openvino", *args, "--calib", "synthetic:4",
                               "--val", "synthetic:6", "--max-drop", "0.005", "--metric", "mae", "--out", tmp_path / "q"))
    assert "over --max-drop" in line and "nothing written" in line
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.*"))


def test_bench_json_schema(cli, artifacts, tiny_ckpt, tmp_path):
    r = cli("bench", tiny_ckpt, artifacts["openvino"], "--backends", "torch,onnx", "--batch", "1,2",
            "--rounds", "1", "--iters", "2", "--data", "synthetic:3", "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.stderr
    d = json.loads((tmp_path / "b.json").read_text())
    assert d["schema"] == "edgekit-bench/1" and d["device"] == "cpu" and d["synthetic"] is True
    # synthetic data: no paper row (it is shown only beside SD-900) and each row's agreement with PyTorch instead
    assert d["reference"] is None and d["machine"]["logical_cpus"] >= 1
    names = [row["name"] for row in d["rows"]]
    assert names[:2] == ["torch", "onnx"] and names[2].startswith("openvino:fp32")
    for row in d["rows"]:
        assert {"size_bytes", "iou", "mae", "latency_ms", "fps_b1", "best_batch", "fps_best"} <= set(row)
        assert row["latency_ms"]["p50"] <= row["latency_ms"]["p90"] and row["latency_ms"]["p99"] is None  # 2 samples
        assert set(row["fps_by_batch"]) == {"1", "2"} and row["fps_b1"] > 0
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_precision_auto_keeps_a_measured_candidate(tiny_ckpt, tmp_path):
    man = compile_model(str(tiny_ckpt), "onnx", "auto", str(tmp_path / "auto"), parity_data="synthetic:4",
                        calib="synthetic:8", subset=8, val="synthetic:4", max_drop=1.0, log=lambda *_: None)
    auto = man["auto"]
    assert {c["precision"] for c in auto["candidates"]} == {"fp32", "int8"}
    best = max((c for c in auto["candidates"] if c["within_budget"]), key=lambda c: c["fps_b1"])
    assert auto["chosen"] == best["precision"] == man["precision"]
    runtime.load(tmp_path / "auto")  # the kept artifact verifies against its manifest
