"""The backend registry: one spec per backend, and what is derived from it."""
import pytest

from edgekit import runtime
from edgekit.backends.registry import backends, default_bench_rows, get_backend, target_names
from edgekit.errors import EdgekitError


def test_one_name_per_backend_everywhere(cli, tiny_ckpt, tmp_path):
    names = [b.name for b in backends()]
    assert len(names) == len(set(names))
    assert {"torch", "onnx", "ort", "openvino", "executorch", "cpu-fused", "trt", "cuda-fused"} <= set(names)
    assert "torch" not in target_names()  # a backend, not a compile target
    from edgekit.cli import main

    assert cli("compile", "--help").exit_code == 0
    target = next(p for p in main.commands["compile"].params if p.name == "target")
    for name in target_names():  # the CLI's help lists what the registry holds (checked unwrapped)
        assert f"{name}:" in target.help
    line = cli("compile", tiny_ckpt, "--target", "nope", "--out", tmp_path / "o").stderr.strip()
    assert line == f"error: unknown target 'nope' (choose from {', '.join(target_names())})"


def test_bench_defaults_come_from_the_specs():
    rows = default_bench_rows("cpu")
    assert rows[0] == "torch" and "openvino:default" in rows
    for row in rows:
        name, _, precision = row.partition(":")
        spec = get_backend(name)
        assert spec.device == "cpu" and (not precision or precision in spec.precisions)


def test_a_backend_this_machine_cannot_build_leaves_the_default_rows(monkeypatch):
    """cpu-fused is a default row where it can be built (a C++ compiler, AVX2+FMA); elsewhere it is left out
    of the default and --all rows with a note, instead of failing the whole benchmark."""
    import dataclasses

    from edgekit.backends import registry
    from edgekit.bench.plan import default_cpu_backends

    spec = get_backend("cpu-fused")
    if spec.not_here() is None:
        assert "cpu-fused:fp32" in default_bench_rows("cpu")
    monkeypatch.setitem(registry._SPECS, "cpu-fused", dataclasses.replace(spec, not_here=lambda: "no C++ compiler (g++)"))
    notes = []
    assert not any(r.startswith("cpu-fused") for r in default_bench_rows("cpu", notes.append))
    assert not any(r.startswith("cpu-fused") for r in default_cpu_backends(True, notes.append))
    assert notes == ["default rows: no cpu-fused rows here (no C++ compiler (g++))",
                     "--all: no cpu-fused rows here (no C++ compiler (g++))"]


def test_torch_variants_are_load_options(tiny_ckpt):
    runner = runtime.load(tiny_ckpt, threads=1)
    assert runner.name == "torch" and runner.precision == "fp32"
    with pytest.raises(EdgekitError, match="need a CUDA device"):
        runtime.load(tiny_ckpt, mode="graph")
    with pytest.raises(EdgekitError, match="unknown mode"):
        runtime.load(tiny_ckpt, mode="jit")
    # an option a backend does not declare is refused (it was dropped silently), None counts as not given;
    # a caller offering one option set to every backend on purpose (bench rows) takes the declared part
    with pytest.raises(EdgekitError, match=r"onnx does not take the load option mode \(it accepts: threads\)"):
        get_backend("onnx").load_kwargs({"threads": 2, "mode": "graph", "device": None})
    assert get_backend("onnx").load_kwargs({"threads": 2, "device": None}) == {"threads": 2}
    assert get_backend("onnx").declared_options({"threads": 2, "mode": "graph", "device": None}) == {"threads": 2}


# --- GPU rows: bench --device gpu reads the same specs (no GPU needed to plan them) ------------------

def test_gpu_bench_defaults_come_from_the_specs():
    import edgekit.bench.gpu as gpu
    from edgekit.backends.torch_eager import TORCH_MODES

    rows = gpu.default_gpu_backends()
    # what the bench ran before the rows came from the registry: same rows, same order
    assert rows == ("eager:fp32", "eager:fp16", "graph:fp32", "graph:fp16", "compile:fp32", "compile:fp16",
                    "cuda-fused:fp32", "cuda-fused:fp16", "trt:fp16", "trt:int8")
    assert gpu.DEFAULT_GPU_BACKENDS == rows
    assert not hasattr(gpu, "TORCH_MODES")  # defined once, in the torch backend
    torch_spec = get_backend("torch")
    assert tuple(torch_spec.variants) == TORCH_MODES and torch_spec.gpu_load_options == {"device": "cuda"}
    for row in rows:
        kind, precision = gpu.parse_gpu_backend(row)
        spec = torch_spec if kind in TORCH_MODES else get_backend(kind)
        assert precision in spec.precisions and precision in spec.gpu_bench_default
        assert kind in TORCH_MODES or spec.device == "gpu"
    assert gpu.parse_gpu_backend("trt") == ("trt", "fp16") and gpu.parse_gpu_backend("graph") == ("graph", "fp32")
    with pytest.raises(EdgekitError, match=r"precision int8 \(choose from fp16, fp32\)"):
        gpu.parse_gpu_backend("cuda-fused:int8")
    with pytest.raises(EdgekitError, match="unknown GPU row 'openvino'"):
        gpu.parse_gpu_backend("openvino")


def test_cuda_fused_availability_is_honest(monkeypatch, tiny_ckpt):
    """cuda-fused declares PyCUDA as its package: without it available() is False and its GPU rows are
    notes with the install line; its compile target still builds without it (nvcc + host emulation)."""
    import sys

    from edgekit.bench.gpu import plan_gpu_rows

    spec = get_backend("cuda-fused")
    assert spec.package == "pycuda" and spec.builds_without_package
    monkeypatch.setitem(sys.modules, "pycuda", None)  # import pycuda fails, as on a machine without it
    assert not spec.available()
    spec.check("fp32")  # no MissingBackendError: building needs no PyCUDA
    rows, skipped = plan_gpu_rows([str(tiny_ckpt)], ["eager:fp32", "cuda-fused:fp16"])
    assert [r.name for r in rows] == ["eager:fp32"]
    assert skipped == [{"name": "cuda-fused:fp16", "reason": "pycuda is not installed: pip install pycuda"}]
    with pytest.raises(EdgekitError, match="pip install pycuda"):
        plan_gpu_rows([str(tiny_ckpt)], ["cuda-fused:fp16"], explicit=True)


def test_a_new_gpu_backend_is_one_spec(monkeypatch, tiny_ckpt):
    """Registering one spec with gpu_bench_default adds its default GPU rows, and bench opens them through
    the spec's own loader with its gpu_load_options (here the real torch loader under another name, on
    the CPU since no GPU is needed to check the plumbing)."""
    import dataclasses

    import numpy as np

    from edgekit.backends import registry
    from edgekit.bench.gpu import default_gpu_backends, open_row, plan_gpu_rows

    torch_spec = get_backend("torch")
    new = dataclasses.replace(torch_spec, name="torch-copy", description="a second GPU backend", variants={},
                              gpu_bench_default=("fp32",), gpu_load_options={"device": "cpu"}, build=None,
                              runs_checkpoints=True)
    monkeypatch.setitem(registry._SPECS, "torch-copy", new)
    assert default_gpu_backends()[-1] != "torch-copy:fp32"  # no compile step: it plans before the compile targets
    assert "torch-copy:fp32" in default_gpu_backends()
    rows, _ = plan_gpu_rows([str(tiny_ckpt)], ["torch-copy"])
    (row,) = rows
    assert (row.name, row.kind, row.mode, row.build) == ("torch-copy:fp32", "torch-copy", None, False)
    runner = open_row(row, max_autotune=False, calib=None, log=print)
    x = np.random.default_rng(0).standard_normal((1, *runner.input_shape)).astype(np.float32)
    np.testing.assert_allclose(runner.infer(x), runtime.load(tiny_ckpt).infer(x), atol=1e-6)
