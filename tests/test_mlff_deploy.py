"""MLFF deployment: the frozen backbone compiled once (pooled tap features), classify on it, refusals, bench."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit import runtime
from edgekit.data.preprocess import PreprocessSpec
from edgekit.errors import EdgekitError
from edgekit.artifact import read_manifest
from edgekit.pipeline.compile import compile_model
from edgekit.models.backbones import load_backbone
from edgekit.models.checkpoint import Checkpoint
from edgekit.models.gmbinet import GMBINet, GMBINetConfig
from edgekit.mlff.classifier import load_mlff
from edgekit.mlff.registry import Registry
from edgekit.train.continual import add_task, task_data_from_folder

from conftest import NEU, one_error_line
from test_mlff import make_folders

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'edgekit[cpu]')")
pytest.importorskip("openvino", reason="openvino not installed (pip install 'edgekit[cpu]')")

QUIET = dict(log=lambda *_: None)


def _tiny_ckpt(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    net = GMBINet(GMBINetConfig(widths=(8, 8, 8, 16, 16), depths=(1, 1, 1, 1), scales=4))
    return Checkpoint.from_model(net, preprocess=PreprocessSpec(input_size=(32, 32))).save(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlffdep")
    ckpt = _tiny_ckpt(root / "tiny.pt", 0)
    data = make_folders(root / "data", ["a", "b", "c"], n=10)
    reg = root / "reg"
    add_task(reg, load_backbone(str(ckpt)), "t1", task_data_from_folder(data), epochs=40, rehearsal=2, cache_dir=None)
    arts = {}
    for target in ("onnx", "openvino"):
        arts[target] = root / f"bb_{target}"
        compile_model(str(reg), target, "fp32", str(arts[target]), parity_data=str(data), **QUIET)
    return {"root": root, "ckpt": ckpt, "data": data, "reg": reg, "arts": arts}


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_backbone_artifact_manifest_and_parity(setup, target):
    art, reg = setup["arts"][target], Registry.open(setup["reg"])
    man = read_manifest(art)
    m = man["model"]
    assert man["target"] == target and man["precision"] == "fp32"
    assert m["kind"] == "mlff-backbone"
    assert m["backbone"] == reg.meta["backbone"] and m["backbone_sha256"] == reg.meta["backbone_sha256"]
    assert m["tap_dims"] == [8, 8, 16, 16] and m["pools"] == ["max", "max", "avg", "avg"] and m["feature_dim"] == 48
    assert m["input_spec"]["shape"] == [3, 32, 32] and man["input"]["shape"] == ["batch", 3, 32, 32]
    assert man["output"]["name"] == "features" and man["output"]["shape"] == ["batch", 48]
    assert man["source"]["sha256"] == reg.meta["backbone_sha256"] and man["source"]["registry"] == str(setup["reg"])
    assert {"torch", "onnx", "edgekit", target if target == "openvino" else "onnxruntime"} <= set(man["tools"])
    p = man["parity"]
    assert p["max_abs_diff"] < 1e-4 and p["top1_agreement"] == 1.0
    assert p["images"] == 6 and p["labelled_images"] == 6 and "test part" in p["data"]
    # the artifact's model is the frozen part exactly: preprocessed image -> pooled tap features
    bb = load_backbone(str(setup["ckpt"]))
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    feats = runtime.load(art).infer(x)
    assert feats.shape == (3, 48)
    np.testing.assert_allclose(feats, bb.pooled(torch.from_numpy(x)).numpy(), atol=1e-4, rtol=0)


def test_classify_on_backbone_artifact_matches_torch(setup, cli):
    files = sorted(str(p) for p in setup["data"].rglob("*.png"))
    want = load_mlff(setup["reg"]).predict(files)
    got = load_mlff(setup["reg"], backbone_artifact=setup["arts"]["openvino"]).predict(files)
    assert [p["class"] for p in got] == [p["class"] for p in want]
    assert max(abs(a["prob"] - b["prob"]) for a, b in zip(got, want)) < 1e-3
    res = cli("classify", setup["data"], "--adapters", setup["reg"], "--backbone-artifact", setup["arts"]["onnx"], "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["class"] for r in rows] == [p["class"] for p in want]


def test_mismatched_backbone_refused(setup, cli, tmp_path):
    other = _tiny_ckpt(tmp_path / "other.pt", 1)  # same architecture, other weights
    res = cli("compile", other, "--as-backbone", "--target", "onnx", "--out", tmp_path / "other_bb",
              "--parity-data", "synthetic:2")
    assert res.exit_code == 0, res.output
    line = one_error_line(cli("classify", setup["data"], "--adapters", setup["reg"], "--backbone-artifact",
                              tmp_path / "other_bb"))
    assert "backbone mismatch" in line and "gmbinet-" in line
    with pytest.raises(EdgekitError, match="backbone mismatch"):
        load_mlff(setup["reg"], backbone_artifact=tmp_path / "other_bb")
    # a segmentation artifact is not a backbone artifact
    res = cli("compile", setup["ckpt"], "--target", "onnx", "--out", tmp_path / "seg", "--parity-data", "synthetic:2")
    assert res.exit_code == 0, res.output
    assert "not an MLFF backbone" in one_error_line(
        cli("classify", setup["data"], "--adapters", setup["reg"], "--backbone-artifact", tmp_path / "seg"))
    assert "not found" in one_error_line(
        cli("classify", setup["data"], "--adapters", setup["reg"], "--backbone-artifact", tmp_path / "nope"))
    # a corrupted artifact file is refused before anything runs
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(setup["arts"]["onnx"], bad)
    with open(bad / "model.onnx", "ab") as f:
        f.write(b"x")
    assert "sha256" in one_error_line(cli("classify", setup["data"], "--adapters", setup["reg"],
                                          "--backbone-artifact", bad))


def test_compile_refusals_leave_nothing(setup, cli, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty_reg"
    empty.mkdir()
    (empty / "registry.json").write_text("{not json")
    one_error_line(cli("compile", empty, "--target", "onnx", "--out", out))
    one_error_line(cli("compile", setup["reg"], "--target", "onnx", "--out", out, "--parity-data", tmp_path / "nope"))
    one_error_line(cli("compile", setup["reg"], "--target", "openvino", "--precision", "auto", "--out", out))
    one_error_line(cli("compile", setup["arts"]["onnx"], "--target", "openvino", "--out", out))
    one_error_line(cli("compile", "nope-net", "--as-backbone", "--target", "onnx", "--out", out))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_int8_backbone_records_accuracy_and_refuses_over_budget(setup, cli, tmp_path, monkeypatch):
    out = tmp_path / "int8"
    man = compile_model(str(setup["reg"]), "openvino", "int8", str(out), parity_data=str(setup["data"]),
                        calib=str(setup["data"]), val=str(setup["data"]), max_drop=1.0, subset=16, **QUIET)
    q = man["quantization"]
    assert q["tool"] == "nncf" and q["metric"] == "top1_accuracy" and q["validation_images"] == 6
    assert 0 <= q["after"] <= 1 and q["drop"] == pytest.approx(q["before"] - q["after"])
    assert "top1_agreement" in man["parity"] and man["parity"]["max_abs_diff"] >= 0
    assert runtime.load(out).infer(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 48)
    # over the budget: one line, nothing written (forced: the check sees a drop of 1.0)
    from edgekit.pipeline import mlff_source as mlff

    real = mlff.BackboneSource.parity

    def worse(self, candidate, images, threads=None, limit=48):
        r = real(self, candidate, images, threads, limit)
        r["accuracy"] = r["accuracy_reference"] - 1.0
        return r

    monkeypatch.setattr(mlff.BackboneSource, "parity", worse)
    line = one_error_line(cli("quantize", setup["reg"], "--target", "openvino", "--calib", setup["data"], "--val",
                              setup["data"], "--max-drop", "0.01", "--subset", "8", "--out", tmp_path / "refused"))
    assert "drops by" in line and "nothing written" in line
    assert not (tmp_path / "refused").exists()


def test_bench_mlff_registry_json(setup, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    res = cli("bench", setup["reg"], "--data", setup["data"], "--backends", "torch,onnx,openvino:fp32",
              "--batch", "1,2", "--rounds", "1", "--iters", "2", "--threads", "1", "--json", out)
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["schema"] == "edgekit-bench/1" and r["kind"] == "mlff" and r["eval_images"] == 6
    assert r["model"]["heads"] == 1 and r["model"]["backbone"] == Registry.open(setup["reg"]).meta["backbone"]
    assert [row["name"] for row in r["rows"]] == ["torch", "onnx", "openvino:fp32"]
    for row in r["rows"]:
        assert 0 <= row["accuracy"] <= 1 and row["top1_agreement_vs_torch"] == 1.0
        assert row["latency_ms"]["samples"] == 2 and row["fps_b1"] > 0 and set(row["fps_by_batch"]) == {"1", "2"}
        assert row["size_bytes"] == row["backbone_bytes"] + row["adapter_bytes"] and row["adapter_bytes"] > 0
        assert row["heads"] == 1
    assert r["rows"][0]["speedup_vs_baseline"] == 1.0
    assert (tmp_path / "bench.png").is_file()
    # bad input: one line each
    assert "--data" in one_error_line(cli("bench", setup["reg"], "--rounds", "1"))
    one_error_line(cli("bench", setup["reg"], setup["ckpt"], "--data", setup["data"]))
    assert "no labelled images" in one_error_line(
        cli("bench", setup["reg"], "--data", make_folders(tmp_path / "other", ["x", "y"], n=5), "--backends", "torch"))


@pytest.mark.skipif(not NEU.is_dir(), reason=f"NEU-CLS not found at {NEU} (reference data from ../shared is absent)")
def test_parity_on_neu_images(tmp_path):
    """The embedded GMBINet encoder as backbone, an adapter on a few NEU images; parity on real NEU images."""
    from edgekit.models.default import DEFAULT_CHECKPOINT
    from edgekit.train.continual import TaskData

    classes = ["crazing", "scratches"]
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted((NEU / c).glob("*.jpg"))[:8]
        paths += files
        labels += [i] * len(files)
    add_task(tmp_path / "reg", load_backbone(str(DEFAULT_CHECKPOINT)), "neu", TaskData(paths, labels, classes),
             epochs=20, rehearsal=2, cache_dir=None)
    man = compile_model(str(tmp_path / "reg"), "openvino", "fp32", str(tmp_path / "bb"), parity_data=str(NEU), **QUIET)
    p = man["parity"]
    assert "neu-cls" in p["data"] and p["images"] == 48
    assert p["max_rel_diff"] < 1e-4 and p["top1_agreement"] >= 0.98
    assert p["labelled_images"] > 0 and abs(p["accuracy"] - p["accuracy_reference"]) <= 0.03


def test_same_padding_convs_export_exactly(tmp_path):
    """TF-'SAME' convs (EfficientNet-Lite0) get constant padding for export: onnxsim folds the run-time
    padding subgraph wrongly where the padding is asymmetric (even sizes; off by 0.6 here without the fix,
    EfficientNet-Lite0 features by up to 48)."""
    import onnxruntime as ort

    from edgekit.pipeline.mlff_source import static_same_padding
    from edgekit.pipeline.onnx_export import export_onnx
    from edgekit.models.backbones import SameConv2d

    torch.manual_seed(0)
    net = torch.nn.Sequential(SameConv2d(3, 8, 3, stride=2), torch.nn.ReLU6(), SameConv2d(8, 8, 5, stride=2, groups=8),
                              SameConv2d(8, 4, 1)).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 36, 28)).astype(np.float32)
    with static_same_padding(net, (1, 3, 36, 28)) as m:
        path = export_onnx(m, (1, 3, 36, 28), tmp_path / "m.onnx")
    assert "forward" not in net[0].__dict__  # the module is as it was
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(y, net(torch.from_numpy(x)).detach().numpy(), atol=1e-5, rtol=0)


def test_task_incremental_runner_times_every_head(setup, tmp_path):
    """Backbone artifact + a task-incremental adapter: one forward gives the logits of all N heads."""
    from edgekit.mlff.runner import load_mlff_runner

    reg = tmp_path / "reg"
    bb = load_backbone(str(setup["ckpt"]))
    for task, classes in (("t1", ["a", "b"]), ("t2", ["a", "b", "c"])):
        add_task(reg, bb, task, task_data_from_folder(setup["data"], classes), setting="task-incremental", epochs=2,
                 cache_dir=None)
    ref = load_mlff_runner(reg)
    art = load_mlff_runner(reg, backbone_artifact=setup["arts"]["openvino"])  # same backbone: accepted
    assert ref.heads == art.heads == 2
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    y = art.infer(x)
    assert y.shape == (2, 5)
    np.testing.assert_allclose(y, ref.infer(x), atol=1e-3, rtol=0)


def test_adapt_holdout_leaves_the_test_part_out(setup, cli, tmp_path):
    res = cli("adapt", "--backbone", setup["ckpt"], "--task", "t", "--data", setup["data"], "--classes", "b,c",
              "--holdout", "0.2", "--registry", tmp_path / "reg", "--epochs", "1", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["images"] == 16  # 2 classes x (10 - 2 held out)
    from edgekit.pipeline.mlff_source import open_images

    from edgekit.utils import sha256_file

    held_out = open_images(str(setup["data"]), "test")  # the part bench and compile parity test on
    assert len(held_out) == 6
    cached = {f.stem for f in (tmp_path / "reg" / "cache").rglob("*.npy")}
    assert len(cached) == 16 and not cached & {sha256_file(p) for p in held_out.items}
