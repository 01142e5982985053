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
    # options a backend does not declare are not passed to it
    assert get_backend("onnx").load_kwargs({"threads": 2, "mode": "graph", "device": None}) == {"threads": 2}
