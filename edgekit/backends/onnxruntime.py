"""ONNX Runtime on the CPU: two targets, ``onnx`` (the simplified ONNX export as it is) and ``ort``
(ONNX Runtime's offline-optimised graph, saved so sessions start from the fused graph). INT8: the
pipeline quantizes the ONNX file with NNCF (Q/DQ)."""
from __future__ import annotations

from pathlib import Path

import shutil

import numpy as np

from edgekit.errors import MissingBackendError
from edgekit.backends.artifact_runner import ArtifactRunner
from edgekit.backends.registry import BackendSpec, register_backend


class OnnxRuntimeRunner(ArtifactRunner):
    name = "onnx"

    def __init__(self, folder: Path, threads: int | None = None):
        super().__init__(folder)
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingBackendError("running ONNX artifacts", "onnxruntime") from None
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        # an artifact's model from the verified bytes, not the path again (ONNX external data, which would be
        # read from beside it, is not supported from bytes, and edgekit never writes it)
        model = self.model_bytes() if self.artifact is not None else str(self.model_path)
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.adopt_input(self.session.get_inputs()[0].shape)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    def close(self) -> None:
        self.session = None  # ORT frees the session (its arenas and threads) with the last reference
        super().close()


def build_onnx(ctx) -> dict:
    shutil.copyfile(ctx.onnx_path(), ctx.folder / "model.onnx")
    return {"model_file": "model.onnx", "runtime": "onnxruntime"}


def build_ort(ctx) -> dict:
    """EXTENDED level: its fusions are portable; ALL adds CPU-layout-specific nodes that tie the file
    to the machine it was built on."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(ctx.folder / "model.onnx")
    ort.InferenceSession(str(ctx.onnx_path()), opts, providers=["CPUExecutionProvider"])
    return {"model_file": "model.onnx", "runtime": "onnxruntime", "ort_optimization": "extended"}


def _load(folder: Path, threads: int | None = None) -> OnnxRuntimeRunner:
    return OnnxRuntimeRunner(folder, threads=threads)


_COMMON = dict(precisions=("fp32", "int8"), load=_load, package="onnxruntime", pip_name="onnxruntime", extra="cpu",
               int8="nncf", quantize_format="onnx", needs={"int8": ("calibration",)},
               tools=("onnx", "onnxruntime", "onnxsim"), kinds=("gmbinet", "mlff-backbone"), from_artifacts=("onnx", "ort"))
ONNX = register_backend(BackendSpec(name="onnx", description="ONNX file (opset 17, simplified), run by ONNX Runtime",
                                    build=build_onnx, model_suffixes=(".onnx",), **_COMMON))
ORT = register_backend(BackendSpec(name="ort", description="ONNX Runtime offline-optimised graph", build=build_ort,
                                   **_COMMON))
