"""``openvino``: OpenVINO IR converted from the ONNX export, run by the CPU plugin.

Compiled per batch size with static shapes (OpenVINO's CPU plugin is fastest on static shapes),
LATENCY hint, one stream: the numbers an application making one synchronous request sees.
The inference precision recorded in the manifest is passed explicitly: OpenVINO's default on CPUs
with AMX/AVX-512-BF16 is bf16, so "fp32" must be asked for.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict

import numpy as np

from edgekit.errors import MissingBackendError
from edgekit.backends.artifact_runner import ArtifactRunner
from edgekit.backends.registry import BackendSpec, register_backend

OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
# Execution-graph layer types that carry the arithmetic: their runtime precision is what a row "ran".
COMPUTE_LAYERS = ("Convolution", "Deconvolution", "FullyConnected", "MatMul")


class OpenVINORunner(ArtifactRunner):
    name = "openvino"

    def __init__(self, folder: Path, threads: int | None = None, hint: str = "LATENCY"):
        super().__init__(folder)
        try:
            import openvino as ov
        except ImportError:
            raise MissingBackendError("running OpenVINO artifacts", "openvino") from None
        self.core = ov.Core()
        if self.artifact is not None:  # the IR and its weights from the verified bytes, not the paths again
            weights = self.artifact.read(self.model_path.with_suffix(".bin").relative_to(self.artifact.folder).as_posix(),
                                         "OpenVINO weights")
            self.model = self.core.read_model(self.model_bytes().decode("utf-8", "replace"),
                                              ov.Tensor(np.frombuffer(weights, dtype=np.uint8).copy()))
        else:
            self.model = self.core.read_model(str(self.model_path))
        self.adopt_input([d.get_length() if d.is_static else None for d in self.model.inputs[0].get_partial_shape()])
        self.config = {"PERFORMANCE_HINT": hint, "NUM_STREAMS": "1" if hint == "LATENCY" else "AUTO"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        infer_precision = self.manifest.get("inference_precision", self.precision)
        if infer_precision in OV_PRECISION:
            self.config["INFERENCE_PRECISION_HINT"] = OV_PRECISION[infer_precision]
        self._compiled: Dict[int, object] = {}
        self._requests: Dict[int, object] = {}

    def compiled(self, batch: int):
        if batch not in self._compiled:
            m = self.model.clone()
            m.reshape({m.inputs[0].any_name: [batch, *self.input_shape]})
            self._compiled[batch] = self.core.compile_model(m, "CPU", self.config)
            self._requests[batch] = self._compiled[batch].create_infer_request()
        return self._compiled[batch]

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        self.compiled(n)
        req = self._requests[n]
        req.infer({0: batch})
        return np.array(req.get_output_tensor(0).data, copy=True)

    def close(self) -> None:
        self._requests.clear()  # requests before the compiled models they belong to
        self._compiled.clear()
        self.model = None
        super().close()

    def executed_precision(self, batch: int = 1) -> dict:
        """Read back from the compiled model: the CPU plugin runs f32 where the CPU lacks bf16 (a bf16
        artifact is then an f32 one), and an INT8 IR runs u8/i8 only on the layers NNCF quantized."""
        compiled = self.compiled(batch)
        hint = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        layers = Counter()
        for op in compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) in COMPUTE_LAYERS:
                layers[info["runtimePrecision"].astype(str)] += 1
        total = sum(layers.values())
        int8 = sum(n for p, n in layers.items() if p in ("u8", "i8"))
        if int8:
            label = f"int8 on {int8}/{total} conv, {hint} rest"
        elif len(layers) == 1:  # one precision; the hint beside it where the two disagree
            label = next(iter(layers)) + ("" if next(iter(layers)) == hint else f" conv, hint {hint}")
        else:
            label = hint + (" (" + ", ".join(f"{p} {n}" for p, n in layers.most_common()) + ")" if layers else "")
        return {"label": label, "inference_precision_hint": hint, "compute_layers": dict(layers),
                "source": "OpenVINO compiled model: INFERENCE_PRECISION_HINT and the execution graph's runtimePrecision"}

    def throughput_queue(self, batch: int, jobs: int):
        """An AsyncInferQueue with ``jobs`` requests in flight (the THROUGHPUT-style measurement)."""
        import openvino as ov

        return ov.AsyncInferQueue(self.compiled(batch), jobs)


def build(ctx) -> dict:
    """IR converted from the ONNX file (about 2x faster here than converting the torch module).

    ``default`` leaves the inference precision to the CPU plugin (bf16 where the CPU has it): the
    plain baseline every other row is compared with.
    """
    import openvino as ov

    src = Path(ctx.onnx_path())
    model = ov.Core().read_model(str(src)) if src.suffix == ".xml" else ov.convert_model(str(src))
    ov.save_model(model, str(ctx.folder / "model.xml"), compress_to_fp16=(ctx.precision == "fp16"))
    return {"model_file": "model.xml", "extra_files": ["model.bin"], "runtime": "openvino",
            "inference_precision": ctx.precision}


def _load(folder: Path, threads: int | None = None, hint: str = "LATENCY") -> OpenVINORunner:
    return OpenVINORunner(folder, threads=threads, hint=hint)


SPEC = register_backend(BackendSpec(
    name="openvino", description="OpenVINO IR (from ONNX), CPU plugin",
    precisions=("fp32", "bf16", "fp16", "int8", "default"), build=build, load=_load, package="openvino",
    pip_name="openvino", extra="cpu", int8="nncf", quantize_format="openvino", needs={"int8": ("calibration",)},
    load_options=("threads", "hint"), async_queue=True, tools=("onnx", "onnxsim", "openvino"),
    bench_default=("default", "fp32", "int8"), kinds=("gmbinet", "mlff-backbone"), model_suffixes=(".xml",),
    # the model files its build reads (ONNX, OpenVINO IR); a cpu-fused weights blob fed to
    # ov.convert_model came out as TensorFlow GraphDef log noise and "Cannot recognize input model"
    from_artifacts=("onnx", "ort", "openvino"),
))
