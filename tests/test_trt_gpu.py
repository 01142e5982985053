"""TensorRT target and ``bench --device gpu``: what runs without a GPU is tested here (the ONNX models
TensorRT would get, checked with ONNX Runtime on the CPU; the refusal of engines built elsewhere;
GPU row planning; clear one-line refusals). Engine builds and GPU timing skip without CUDA/TensorRT."""
import importlib.util
import json

import numpy as np
import pytest

from edgekit.errors import EdgekitError
from edgekit.backends.tensorrt import build as trt

from conftest import one_error_line

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install 'edgekit[cpu]')")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'edgekit[cpu]')")

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


needs_trt_gpu = pytest.mark.skipif(not (HAS_TRT and _cuda()),
                                   reason="needs tensorrt and a CUDA GPU (TensorRT is not installable here: pip install tensorrt)")
needs_gpu = pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU (torch here is the CPU build)")


@pytest.fixture(scope="module")
def tiny_onnx(tiny_ckpt, tmp_path_factory):
    from edgekit.pipeline.onnx_export import export_onnx
    from edgekit.models.checkpoint import load_checkpoint

    return export_onnx(load_checkpoint(tiny_ckpt).build(), (1, 3, 64, 64), tmp_path_factory.mktemp("onnx") / "m.onnx")


@pytest.fixture(scope="module")
def images():
    from edgekit.data.datasets import open_segmentation
    from edgekit.data.preprocess import PreprocessSpec, preprocess

    spec = PreprocessSpec(input_size=(64, 64))
    return [preprocess([s.image()], spec) for s in open_segmentation("synthetic:8", "test").samples]


def _types(model):
    from onnx import TensorProto

    inits = {i.name: TensorProto.DataType.Name(i.data_type) for i in model.graph.initializer}
    return inits


# --- fp16 ONNX (TensorRT 11 strongly typed input) -----------------------------------------------

def test_fp16_onnx_types_and_numerics(tiny_onnx, images, tmp_path):
    report = trt.prepare_onnx(tiny_onnx, tmp_path / "f16.onnx", "fp16", check_batches=images, log=lambda *_: None)
    m = onnx.load(str(tmp_path / "f16.onnx"))
    onnx.checker.check_model(m)
    # I/O stay float32: the runner and the manifest's input spec do not change.
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    inits = _types(m)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    head = set(trt.head_nodes(onnx.load(str(tiny_onnx))))
    body_w = [inits[n.input[1]] for n in convs if n.name not in head]
    head_w = [inits[n.input[1]] for n in convs if n.name in head]
    assert body_w and set(body_w) == {"FLOAT16"}
    assert head_w == ["FLOAT"]  # the prediction head's conv (and its sigmoid) stay float32
    sig = [n for n in m.graph.node if n.op_type == "Sigmoid" and n.name in head]
    assert len(sig) == 1
    # Numerics with ONNX Runtime on the CPU, against the float ONNX.
    p = report["parity_vs_fp32_onnx"]
    assert p["images"] == len(images) and p["runtime"] == "onnxruntime CPU"
    assert 0 < p["max_abs_diff"] < 5e-3 and p["mean_abs_diff"] < 1e-3
    assert report["initializer_types"]["FLOAT16"] > report["initializer_types"]["FLOAT"]


def test_head_nodes_stop_at_last_conv(tiny_onnx):
    names = trt.head_nodes(onnx.load(str(tiny_onnx)))
    assert any("conv_out1" in n and n.endswith("Conv") for n in names)
    assert any(n.endswith("Sigmoid") for n in names) and any("Resize" in n for n in names)
    assert not any("DF1" in n for n in names)  # nothing before the head conv


# --- INT8: Q/DQ from NNCF, verified on the CPU before TensorRT sees it ---------------------------

@pytest.fixture(scope="module")
def qdq(tiny_onnx, images, tmp_path_factory):
    pytest.importorskip("nncf", reason="nncf not installed (pip install 'edgekit[cpu]')")
    out = tmp_path_factory.mktemp("q") / "q.onnx"
    report = trt.prepare_onnx(tiny_onnx, out, "int8", check_batches=images, calibration=images, subset=8,
                              log=lambda *_: None)
    return out, report


def test_qdq_onnx_is_tensorrt_int8_and_close(qdq):
    path, report = qdq
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    assert report["qdq_nodes"] > 0 and report["unsigned_rewritten"] > 0 and report["weight_qdq_pairs"] > 0
    assert trt.qdq_problems(m) == []  # symmetric signed INT8 only: what TensorRT accepts
    p = report["parity_vs_fp32_onnx"]
    assert p["images"] == 8 and 0 < p["max_abs_diff"] < 0.1 and p["mean_abs_diff"] < 0.01
    # The head stays float (stem-head-float): no Q/DQ right before the output.
    last = m.graph.node[-1]
    assert last.op_type == "Resize"


def test_signed_rewrite_keeps_numerics(tiny_onnx, images):
    """uint8 zp=0 -> int8 zp=0 with scale 255/127 covers the same range: outputs stay close."""
    pytest.importorskip("nncf")
    from edgekit.compress.quantize import quantize_model

    q = quantize_model(onnx.load(str(tiny_onnx)), "onnx", images, subset_size=8)
    assert trt.qdq_problems(q)  # NNCF's CPU placement: unsigned activations
    before = q.SerializeToString()
    signed, n = trt.to_signed_qdq(onnx.load_from_string(before))
    assert n > 0 and trt.qdq_problems(signed) == []
    p = trt.onnx_parity(onnx.load_from_string(before), signed, images)
    assert p["max_abs_diff"] < 0.05


def test_weight_qdq_as_float_weights_same_numbers(tiny_onnx, images):
    pytest.importorskip("nncf")
    from onnx import numpy_helper

    from edgekit.compress.quantize import quantize_model

    q, _ = trt.to_signed_qdq(quantize_model(onnx.load(str(tiny_onnx)), "onnx", images, subset_size=8))
    before = q.SerializeToString()
    f, n = trt.float_weight_qdq(q)
    onnx.checker.check_model(f)
    inits = {i.name: numpy_helper.to_array(i) for i in f.graph.initializer}
    assert n > 0
    for node in f.graph.node:  # no int8 constant feeds a DequantizeLinear any more
        if node.op_type == "DequantizeLinear":
            assert node.input[0] not in inits
    assert trt.onnx_parity(onnx.load_from_string(before), f, images)["max_abs_diff"] < 1e-5


def test_asymmetric_qdq_refused():
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(3, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="Q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="DQ")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    assert trt.qdq_problems(model)
    with pytest.raises(EdgekitError, match="asymmetric"):
        trt.to_signed_qdq(model)


def test_entropy_scheme_hands_the_float_graph_to_tensorrt(tiny_onnx, images, tmp_path):
    report = trt.prepare_onnx(tiny_onnx, tmp_path / "m.onnx", "int8", check_batches=images[:2],
                              scheme=trt.ENTROPY_SCHEME, log=lambda *_: None)
    assert "IInt8EntropyCalibrator2" in report["quantization"]
    assert report["parity_vs_fp32_onnx"]["max_abs_diff"] == 0.0


# --- versions and the refusal of engines built elsewhere (pure functions) -------------------------

BUILT = {"tensorrt": {"version": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}}


def test_same_version_and_gpu_loads():
    env = {"version": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert trt.compatibility_problem(BUILT, env) is None


@pytest.mark.parametrize("env, words", [
    ({"version": "10.4.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}, ["TensorRT 10.3.0", "TensorRT 10.4.0"]),
    ({"version": "11.0.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}, ["TensorRT 11.0.0"]),
    ({"version": "10.3.0", "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}, ["NVIDIA A100", "sm_80", "sm_90"]),
    ({"version": "10.3.0", "gpu": "NVIDIA H100 PCIe", "compute_capability": "9.0"}, ["NVIDIA H100 PCIe"]),
    ({"version": "10.3.0", "gpu": None, "compute_capability": None}, ["no CUDA GPU"]),
    ({"version": None, "gpu": None, "compute_capability": None}, ["pip install tensorrt"]),
])
def test_engine_from_elsewhere_refused_in_one_line(env, words):
    msg = trt.compatibility_problem(BUILT, env)
    assert msg and "\n" not in msg
    for w in words:
        assert w in msg
    if env.get("version") and env.get("gpu"):
        assert "rebuild it here with edgekit compile --target trt" in msg


def test_manifest_without_tensorrt_record_refused():
    assert "does not record" in trt.compatibility_problem({}, {"version": "10.3.0"})


@pytest.mark.parametrize("version, api", [("8.5.3", "builder-flags"), ("8.6.1.6", "builder-flags"),
                                          ("10.13.0", "builder-flags"), ("11.0.0", "strongly-typed"),
                                          ("11.4.1", "strongly-typed")])
def test_api_generation(version, api):
    assert trt.api_generation(version) == api
    assert trt.implicit_calibration_available(version) == (api == "builder-flags")


def test_old_tensorrt_refused():
    with pytest.raises(EdgekitError, match="8.5 or newer"):
        trt.api_generation("8.4.3")


def test_describe_environment_here():
    env = trt.describe_environment()
    assert set(env) >= {"version", "gpu", "compute_capability"}
    if not HAS_TRT:
        assert env["version"] is None


# --- CLI refusals without TensorRT / CUDA ----------------------------------------------------------

@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_compile_trt_without_tensorrt_names_package(cli, tiny_ckpt, tmp_path):
    for precision in ("fp16", "int8"):
        line = one_error_line(cli("compile", tiny_ckpt, "--target", "trt", "--precision", precision,
                                  "--out", tmp_path / "o"))
        assert "pip install tensorrt" in line
    assert not (tmp_path / "o").exists()


def test_trt_precisions_checked_first(cli, tiny_ckpt, tmp_path):
    line = one_error_line(cli("compile", tiny_ckpt, "--target", "trt", "--precision", "fp32", "--out", tmp_path / "o"))
    assert "does not offer precision fp32" in line


def test_trt_builds_only_from_checkpoints_and_onnx(tiny_ckpt, tmp_path):
    """An OpenVINO artifact is refused before anything is built (TensorRT parses ONNX only): the
    spec's from_artifacts, checked by the pipeline (called past the package check, which needs TensorRT)."""
    pytest.importorskip("openvino", reason="openvino not installed (pip install 'edgekit[cpu]')")
    from edgekit.backends.registry import get_backend
    from edgekit.pipeline.build import build_artifact
    from edgekit.pipeline.compile import CompileRequest, compile_model

    compile_model(str(tiny_ckpt), "openvino", "fp32", str(tmp_path / "ov"), parity_data="synthetic:2",
                  log=lambda *_: None)
    with pytest.raises(EdgekitError, match="openvino artifact; compile trt from the checkpoint or an artifact of onnx, ort"):
        build_artifact(get_backend("trt"), CompileRequest(source=tmp_path / "ov", target="trt", precision="fp16",
                                                          out=tmp_path / "out", parity_data="synthetic:2", subset=2,
                                                          int8_scheme="stem-head-float"), log=print)
    assert not (tmp_path / "out").exists()


def _fake_trt_artifact(folder, tiny_ckpt):
    from edgekit.artifact import write_manifest
    from edgekit.models.checkpoint import load_checkpoint

    ck = load_checkpoint(tiny_ckpt)
    folder.mkdir()
    (folder / "model.engine").write_bytes(b"not an engine")
    write_manifest(folder, {"target": "trt", "precision": "fp16", "model_file": "model.engine", "runtime": "tensorrt",
                            "tensorrt": dict(BUILT["tensorrt"]), "model": {"kind": "gmbinet", "config": ck.config},
                            "preprocess": ck.preprocess.to_dict()}, ["model.engine"])
    return folder


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_trt_artifact_without_tensorrt_one_line(cli, tiny_ckpt, tmp_path):
    art = _fake_trt_artifact(tmp_path / "a", tiny_ckpt)
    from edgekit import runtime

    with pytest.raises(EdgekitError, match="pip install tensorrt"):
        runtime.load(art)


@pytest.mark.skipif(_cuda(), reason="a CUDA device is present")
def test_bench_gpu_refused_without_cuda(cli, tiny_ckpt):
    line = one_error_line(cli("bench", tiny_ckpt, "--device", "gpu"))
    assert "needs a CUDA device" in line
    line = one_error_line(cli("bench", tiny_ckpt, "--device", "gpu", "--backends", "eager:bf16"))
    assert "precision bf16" in line
    line = one_error_line(cli("bench", tiny_ckpt, "--device", "gpu", "--backends", "openvino"))
    assert "unknown GPU row" in line


# --- GPU row planning (no GPU needed) --------------------------------------------------------------

def test_gpu_rows_planned_for_a_checkpoint(tiny_ckpt):
    from edgekit.bench.gpu import DEFAULT_GPU_BACKENDS, plan_gpu_rows

    rows, skipped = plan_gpu_rows([str(tiny_ckpt)], DEFAULT_GPU_BACKENDS, available={"cuda-fused": False, "trt": False})
    assert [r.name for r in rows] == ["eager:fp32", "eager:fp16", "graph:fp32", "graph:fp16", "compile:fp32",
                                      "compile:fp16"]
    assert {r.mode for r in rows} == {"eager", "graph", "compile"} and {r.precision for r in rows} == {"fp32", "fp16"}
    assert [s["name"] for s in skipped] == ["cuda-fused:fp32", "cuda-fused:fp16", "trt:fp16", "trt:int8"]
    assert "pip install tensorrt" in skipped[-1]["reason"]
    rows, skipped = plan_gpu_rows([str(tiny_ckpt)], DEFAULT_GPU_BACKENDS, available={"cuda-fused": True, "trt": True})
    assert not skipped and [r.name for r in rows][-4:] == ["cuda-fused:fp32", "cuda-fused:fp16", "trt:fp16", "trt:int8"]
    assert all(r.build for r in rows if r.kind == "trt")


def test_gpu_rows_explicit_request_that_cannot_run(tiny_ckpt):
    from edgekit.bench.gpu import plan_gpu_rows

    with pytest.raises(EdgekitError, match="pip install tensorrt"):
        plan_gpu_rows([str(tiny_ckpt)], ["eager:fp32", "trt:int8"], available={"cuda-fused": False, "trt": False},
                      explicit=True)


def test_gpu_rows_take_trt_artifacts_and_refuse_cpu_ones(tiny_ckpt, tmp_path):
    from edgekit.bench.gpu import plan_gpu_rows
    from edgekit.pipeline.compile import compile_model

    art = _fake_trt_artifact(tmp_path / "engine_fp16", tiny_ckpt)
    rows, _ = plan_gpu_rows([str(art)], ["eager:fp32"], available={"cuda-fused": False, "trt": False})
    assert [(r.name, r.kind, r.build) for r in rows] == [("trt:fp16 (engine_fp16)", "trt", False)]
    cpu_art = tmp_path / "onnx"
    compile_model(str(tiny_ckpt), "onnx", "fp32", str(cpu_art), parity_data="synthetic:2", log=lambda *_: None)
    with pytest.raises(EdgekitError, match="CPU backend"):
        plan_gpu_rows([str(cpu_art)], ["eager:fp32"], available={"cuda-fused": False, "trt": False})


def test_gpu_table_rows_from_a_result():
    """The table code on a GPU-shaped result (no GPU: a result dict as run_gpu_bench writes it)."""
    from edgekit.bench.gpu import PAPER_GPU_ROW, TABLE_COLUMNS, table_rows

    row = {"name": "graph:fp16", "size_bytes": 800000, "iou": 0.87, "mae": 0.013,
           "latency_ms": {"p50": 1.7, "p90": 1.8, "p99": 2.0}, "fps_b1": 588.0,
           "fps_by_batch": {"1": 588.0, "32": 4600.0}, "speedup_vs_baseline": 8.8, "on_device": True}
    out = table_rows({"rows": [row], "reference": PAPER_GPU_ROW,
                      "skipped": [{"name": "trt:fp16", "reason": "tensorrt is not installed"}]})
    assert len(out) == 3 and all(len(r) == len(TABLE_COLUMNS) for r in out)
    assert out[0][6] == "4600 (b32)" and out[1][5] == "1048" and "not run" in out[2][0]


# --- on a GPU (skip here) ----------------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torch_gpu_rows_match_cpu(tiny_ckpt, mode, precision):
    from edgekit import runtime
    from edgekit.backends.torch_eager import TorchGpuRunner
    from edgekit.models.checkpoint import load_checkpoint

    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    gpu = TorchGpuRunner(load_checkpoint(tiny_ckpt), mode, precision)
    ref = runtime.load(tiny_ckpt).infer(x)
    out = gpu.infer(x)
    assert np.abs(out - ref).max() < (1e-3 if precision == "fp32" else 2e-2)


@needs_gpu
def test_bench_gpu_json(cli, tiny_ckpt, tmp_path):
    r = cli("bench", tiny_ckpt, "--device", "gpu", "--backends", "eager:fp32,graph:fp16", "--batch", "1,4",
            "--rounds", "1", "--iters", "3", "--data", "synthetic:3", "--json", tmp_path / "g.json")
    assert r.exit_code == 0, r.stderr
    d = json.loads((tmp_path / "g.json").read_text())
    assert d["schema"] == "edgekit-bench/1" and d["device"] == "gpu" and d["machine"]["gpu"]
    assert d["reference"]["fps_b1"] == 1048.0
    assert [row["name"] for row in d["rows"]] == ["eager:fp32", "graph:fp16"]
    for row in d["rows"]:
        assert set(row["fps_by_batch"]) == {"1", "4"} and row["on_device"] is True


@needs_trt_gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_trt_engine_builds_loads_and_matches(tiny_ckpt, tmp_path, precision):
    from edgekit import runtime
    from edgekit.artifact import read_manifest
    from edgekit.pipeline.compile import compile_model

    man = compile_model(str(tiny_ckpt), "trt", precision, str(tmp_path / "e"), calib="synthetic:8", subset=8,
                        parity_data="synthetic:4", log=lambda *_: None)
    assert man["tensorrt"]["version"] and man["tensorrt"]["gpu"] and man["tensorrt"]["compute_capability"]
    assert man["onnx_check"]["parity_vs_fp32_onnx"]["images"] > 0
    assert man["parity"]["max_abs_diff"] < (0.05 if precision == "fp16" else 0.2)
    runner = runtime.load(tmp_path / "e")
    x = np.random.default_rng(0).standard_normal((32, 3, 64, 64)).astype(np.float32)
    assert runner.infer(x).shape == (32, 1, 64, 64)
    assert read_manifest(tmp_path / "e")["files"]["model.engine"]
