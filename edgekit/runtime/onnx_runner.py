"""ONNX Runtime (CPU) runner for ``onnx`` and ``ort`` artifacts."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.errors import MissingBackendError
from edgekit.runtime.artifact_runner import ArtifactRunner, recognizes_target
from edgekit.runtime.base import Backend, register_backend


class OnnxRuntimeRunner(ArtifactRunner):
    name = "onnxruntime"

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
        self.session = ort.InferenceSession(str(self.model_path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.adopt_input(self.session.get_inputs()[0].shape)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: self._check_batch(batch)})[0]


register_backend(Backend("onnxruntime", recognizes_target("onnx", "ort", suffix=".onnx"),
                         lambda p, threads=None, **_: OnnxRuntimeRunner(p, threads=threads), priority=20))
