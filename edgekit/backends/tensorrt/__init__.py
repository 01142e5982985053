"""``trt``: TensorRT engines (GPU). Build: ``build.py`` (typed ONNX checked with ONNX Runtime on the CPU,
then the engine); run: ``runner.py``. Both import TensorRT only when used."""
from __future__ import annotations

from pathlib import Path

from edgekit.backends.registry import BackendSpec, register_backend


def _build(ctx) -> dict:
    from edgekit.backends.tensorrt.build import build

    return build(ctx)


def _load(folder: Path, device: int = 0):
    from edgekit.backends.tensorrt.runner import TensorRTRunner

    return TensorRTRunner(folder, device=device)


SPEC = register_backend(BackendSpec(
    name="trt", description="TensorRT engine (GPU)", precisions=("fp16", "int8"), build=_build, load=_load,
    package="tensorrt", pip_name="tensorrt", extra="trt", device="gpu", int8="builder",
    needs={"int8": ("calibration",)}, load_options=("device",), tools=("onnx", "onnxruntime", "nncf", "tensorrt"),
    from_artifacts=("onnx", "ort"), bench_default=("fp16",), gpu_bench_default=("fp16", "int8"),
))
