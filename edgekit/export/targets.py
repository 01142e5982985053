"""The table of deployment targets: it drives argument checks, ``edgekit compile`` and the benchmark.

Each target builds its files from the simplified ONNX export into an artifact folder. A target
whose package is missing fails only when chosen, with one line naming what to install.
"""
from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from edgekit.errors import EdgekitError, MissingBackendError


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    precisions: Tuple[str, ...]
    package: Optional[str]  # the Python package compiling needs (import name); None: none beyond edgekit
    pip_name: str
    build: Callable[..., dict]  # (onnx_path, folder, precision) -> manifest fields (model_file, ...)

    def check(self, precision: str) -> None:
        if precision not in self.precisions:
            raise EdgekitError(f"target {self.name} does not offer precision {precision} "
                               f"(choose from {', '.join(self.precisions)})")
        if self.package is not None and importlib.util.find_spec(self.package) is None:
            raise MissingBackendError(f"target {self.name}", self.pip_name)


def _build_onnx(onnx_path: Path, folder: Path, precision: str) -> dict:
    shutil.copyfile(onnx_path, folder / "model.onnx")
    return {"model_file": "model.onnx", "runtime": "onnxruntime"}


def _build_ort(onnx_path: Path, folder: Path, precision: str) -> dict:
    """ONNX Runtime's offline graph optimisation, saved, so sessions start with the fused graph.

    EXTENDED level: its fusions are portable; ALL adds CPU-layout-specific nodes that tie the file
    to the machine it was built on.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(folder / "model.onnx")
    ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    return {"model_file": "model.onnx", "runtime": "onnxruntime", "ort_optimization": "extended"}


def _build_openvino(onnx_path: Path, folder: Path, precision: str) -> dict:
    """IR converted from the ONNX file (about 2x faster here than converting the torch module).

    ``default`` leaves the inference precision to the CPU plugin (bf16 where the CPU has it): the
    plain baseline every other row is compared with.
    """
    import openvino as ov

    src = Path(onnx_path)
    model = ov.Core().read_model(str(src)) if src.suffix == ".xml" else ov.convert_model(str(src))
    ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=(precision == "fp16"))
    return {"model_file": "model.xml", "extra_files": ["model.bin"], "runtime": "openvino",
            "inference_precision": precision}


def _build_from_checkpoint(onnx_path: Path, folder: Path, precision: str) -> dict:
    raise EdgekitError("this target builds from the checkpoint: see edgekit.export.compile.compile_model")


def _build_trt(onnx_path: Path, folder: Path, precision: str) -> dict:
    """Direct use without calibration data: fp16 only (``compile_model`` calls edgekit.export.trt itself,
    which also builds int8 from a Q/DQ model or with TensorRT's calibrator; see that module)."""
    from edgekit.export.trt import build_trt

    if precision != "fp16":
        raise EdgekitError("target trt int8 needs calibration images: use edgekit compile --target trt")
    import numpy as np
    import onnx

    shape = [d.dim_value or 1 for d in onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim]
    check = [np.random.default_rng(i).standard_normal(shape).astype(np.float32) for i in range(4)]

    class _Spec:  # the input shape, as a PreprocessSpec gives it
        channels, input_size = shape[1], tuple(shape[2:])

    return build_trt(onnx_path, folder, precision, spec=_Spec, check_batches=check, log=lambda *_: None)


TARGETS: Dict[str, Target] = {t.name: t for t in (
    Target("onnx", "ONNX file (opset 17, simplified), run by ONNX Runtime", ("fp32", "int8", "auto"),
           "onnxruntime", "onnxruntime", _build_onnx),
    Target("ort", "ONNX Runtime offline-optimised graph", ("fp32", "int8", "auto"), "onnxruntime", "onnxruntime", _build_ort),
    Target("openvino", "OpenVINO IR (from ONNX), CPU plugin", ("fp32", "bf16", "fp16", "int8", "default", "auto"),
           "openvino", "openvino", _build_openvino),
    Target("trt", "TensorRT engine (GPU)", ("fp16", "int8"), "tensorrt", "tensorrt", _build_trt),
    # Our own kernels: built from the checkpoint (not the ONNX file) by edgekit.export.cuda_fused;
    # PyCUDA is needed to run the artifact, not to build and verify it (host emulation).
    Target("cuda-fused", "edgekit's fused CUDA kernels (GPU, PyCUDA)", ("fp16", "fp32"), None, "pycuda",
           _build_from_checkpoint),
    # Our own CPU kernels: built from the checkpoint by edgekit.backends.cpu_fused (needs a C++ compiler).
    Target("cpu-fused", "edgekit's fused CPU kernels (C++, AVX2 / AVX-512)", ("fp32",), None, "g++",
           _build_from_checkpoint),
)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise EdgekitError(f"unknown target {name!r} (choose from {', '.join(TARGETS)})")
    return TARGETS[name]
