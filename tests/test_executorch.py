"""The executorch target: .pte with the XNNPACK delegate, fp32 and PT2E INT8, through the registry."""
import importlib.util
import json

import numpy as np
import pytest

from edgekit import runtime
from edgekit.artifact import read_manifest
from edgekit.errors import EdgekitError
from edgekit.pipeline.compile import compile_model

from conftest import one_error_line, tiny_config

needs_executorch = pytest.mark.skipif(importlib.util.find_spec("executorch") is None,
                                      reason="executorch not installed (pip install 'edgekit[edge]')")


def _small_net():
    """Two convolutions, BN, ReLU, sigmoid: lowers in seconds, enough to see what XNNPACK takes."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 1, 3, padding=1), nn.Sigmoid()).eval()


def _run_pte(data: bytes, x: np.ndarray) -> np.ndarray:
    import torch
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(data).load_method("forward")
    return method.execute([torch.from_numpy(x)])[0].numpy()


@needs_executorch
def test_export_program_fp32_and_int8_really_quantized():
    import torch

    from edgekit.backends.executorch import export_program

    model, rng = _small_net(), np.random.default_rng(0)
    calib = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(4)]
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()

    data, report = export_program(model, (1, 3, 32, 32), "fp32", log=lambda *_: None)
    assert report["delegated_partitions"] >= 1 and report["convolutions_in_delegates"] == 2
    assert report["quantized_convolutions"] == 0 and report["quantize_dequantize_nodes_in_delegates"] == 0
    assert np.abs(_run_pte(data, x) - ref).max() < 1e-5

    data8, report8 = export_program(model, (1, 3, 32, 32), "int8", calib, log=lambda *_: None)
    assert report8["quantized_convolutions"] == report8["convolutions_in_delegates"] == 2
    assert report8["quantize_dequantize_nodes_in_delegates"] > 0
    y8 = _run_pte(data8, x)
    # int8 arithmetic: close to float, but not float (a no-op quantizer gives ~1e-6)
    assert 1e-4 < np.abs(y8 - ref).max() < 0.1


@needs_executorch
def test_int8_that_quantizes_nothing_is_refused(monkeypatch):
    """What torch.ao's prepare_pt2e does with the XNNPACK quantizer's (torchao) annotations: nothing."""
    import edgekit.backends.executorch as et

    monkeypatch.setattr(et, "quantize_pt2e", lambda model, example, calibration, log: model)
    with pytest.raises(EdgekitError, match="no convolution was quantized"):
        et.export_program(_small_net(), (1, 3, 32, 32), "int8", [np.zeros((1, 3, 32, 32), np.float32)],
                          log=lambda *_: None)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """A random GMBINet with 2 groups per GMBI module at 64x64: torch.export and the XNNPACK passes
    cost time per graph node, and this one has about half the nodes of conftest's tiny model."""
    import torch

    from edgekit.models.checkpoint import Checkpoint
    from edgekit.models.gmbinet import GMBINet

    torch.manual_seed(0)
    ck = Checkpoint.from_model(GMBINet(tiny_config(scales=2)).eval(), classes=["inclusion", "patches", "scratches"])
    ck.preprocess.input_size = (64, 64)
    return ck.save(tmp_path_factory.mktemp("ck") / "small.pt")


@pytest.fixture(scope="module")
def fp32_artifact(small_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("et") / "fp32"
    compile_model(str(small_ckpt), "executorch", "fp32", str(out), parity_data="synthetic:4", log=lambda *_: None)
    return out


@needs_executorch
def test_fp32_artifact_manifest_runner_and_eval(cli, fp32_artifact, small_ckpt):
    man = read_manifest(fp32_artifact)
    assert man["target"] == "executorch" and man["precision"] == "fp32" and man["model_file"] == "model.pte"
    assert man["runtime"] == "executorch" and set(man["files"]) == {"model.pte"}
    assert {"torch", "executorch", "edgekit"} <= set(man["tools"])
    low = man["lowering"]
    assert low["delegate"] == "xnnpack" and low["delegated_partitions"] >= 1 and low["convolutions_in_delegates"] > 0
    assert man["batch"]["exported"] == [1, 3, 64, 64]
    assert man["parity"]["max_abs_diff"] < 1e-4 and man["parity"]["mask_iou_agreement"] > 0.99
    # a batch of 3 on the batch-1 program: one call per image, same result as torch
    x = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    art = runtime.load(fp32_artifact, threads=1)
    assert art.name == "executorch" and art.input_shape == (3, 64, 64)
    y = art.infer(x)
    assert y.shape == (3, 1, 64, 64) and y.dtype == np.float32
    assert np.abs(y - runtime.load(small_ckpt).infer(x)).max() < 1e-4
    r = cli("eval", fp32_artifact, "--data", "synthetic:3", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["model"].startswith("executorch fp32")


@needs_executorch
def test_corrupt_pte_refused(cli, fp32_artifact, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(fp32_artifact, bad)
    with open(bad / "model.pte", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    line = one_error_line(cli("eval", bad, "--data", "synthetic:2"))
    assert "model.pte" in line


@needs_executorch
def test_int8_artifact_with_budget(small_ckpt, tmp_path):
    man = compile_model(str(small_ckpt), "executorch", "int8", str(tmp_path / "q"), calib="synthetic:8", subset=8,
                        parity_data="synthetic:4", val="synthetic:4", max_drop=1.0, log=lambda *_: None)
    q, low = man["quantization"], man["lowering"]
    assert q["quantizer"] == "XNNPACKQuantizer" and q["calibration_images"] == 8
    assert q["quantized_convolutions"] == low["quantized_convolutions"] == low["convolutions_in_delegates"] > 0
    assert {"before", "after", "drop"} <= set(q) and q["max_drop"] == 1.0
    assert 0 < man["parity"]["max_abs_diff"] < 0.5  # quantized, still the same model
    runner = runtime.load(tmp_path / "q")
    assert runner.precision == "int8"
    assert runner.infer(np.zeros((2, 3, 64, 64), np.float32)).shape == (2, 1, 64, 64)


def test_int8_needs_calibration(cli, tiny_ckpt, tmp_path):
    line = one_error_line(cli("compile", tiny_ckpt, "--target", "executorch", "--precision", "int8",
                               "--out", tmp_path / "q"))
    assert "--calib" in line and not (tmp_path / "q").exists()


def test_missing_executorch_names_the_extra(cli, tiny_ckpt, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name, *a))
    line = one_error_line(cli("compile", tiny_ckpt, "--target", "executorch", "--out", tmp_path / "a"))
    assert "executorch" in line and not (tmp_path / "a").exists()


@needs_executorch
def test_published_model_on_real_images(cli, published_ckpt, sd900, tmp_path):
    r = cli("compile", published_ckpt, "--target", "executorch", "--parity-data", sd900, "--out", tmp_path / "a",
            "--json")
    assert r.exit_code == 0, r.stderr
    man = json.loads(r.stdout)
    assert "SD-Saliency-900" in man["parity"]["data"] and man["parity"]["min_mask_iou_agreement"] > 0.99
    assert man["parity"]["max_abs_diff"] < 1e-3
    r = cli("eval", tmp_path / "a", "--data", sd900, "--split", "test", "--limit", "12", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["overall"]["iou"] > 0.8
