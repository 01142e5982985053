"""``executorch``: a PyTorch ExecuTorch program (``.pte``) with its XNNPACK delegate, the format the
PyTorch edge runtime runs on ARM boards.

Build: ``torch.export`` of the float model -> (INT8 only) PT2E static quantization with
ExecuTorch's ``XNNPACKQuantizer`` (symmetric, per-channel weights, calibrated on ``ctx.calibration``)
-> ``to_edge_transform_and_lower`` with the ``XnnpackPartitioner`` -> ``to_executorch``.
The quantizer annotates with torchao's PT2E types, so ``prepare_pt2e`` / ``convert_pt2e`` must be
torchao's: torch's own ``torch.ao`` versions of those functions ignore its annotations and quantize
nothing, silently. So the build counts what was quantized in the lowered program (convolutions
handed to XNNPACK with dequantized int8 weights and inputs) and refuses an INT8 build with none.

Batch: the program is exported with a static ``1 x C x H x W`` input (an edge device serves one
image per request; a fixed shape lets ExecuTorch plan all memory ahead). The runner runs a batch of N
as N calls of that program.
"""
from __future__ import annotations

import contextlib
import io
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from edgekit.backends.artifact_runner import ArtifactRunner
from edgekit.backends.registry import BackendSpec, register_backend
from edgekit.errors import EdgekitError, MissingBackendError

MODEL_FILE = "model.pte"
_CONVS = ("aten.convolution.default", "aten.linear.default", "aten.addmm.default", "aten.mm.default")


def _op_name(node) -> str:
    """``aten.convolution.default`` for an ATen or edge-dialect op (whose str() carries the whole schema)."""
    import torch

    op = getattr(node.target, "_op", node.target)  # an EdgeOpOverload wraps the ATen OpOverload
    if isinstance(op, torch._ops.OpOverload):
        return str(op)
    return str(getattr(op, "__name__", op))


def _is_dequantize(node) -> bool:
    return hasattr(node, "op") and node.op == "call_function" and ".dequantize_per_" in _op_name(node)


def lowering_report(edge_program) -> dict:
    """What the XNNPACK delegate took and what stays in ExecuTorch's portable kernels.

    Read from the edge program before serialisation: each delegate's ``original_module`` is the
    subgraph handed to XNNPACK's preprocess. A convolution inside a delegate whose input and weight
    both come from dequantize nodes is built by XNNPACK as an int8 (qs8) convolution.
    """
    top = edge_program.exported_program().graph_module
    outside: Counter = Counter()
    inside: Counter = Counter()
    quantized_convs = 0
    partitions = 0
    for node in top.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node)
        if name == "executorch_call_delegate":
            partitions += 1
        elif name != "getitem":
            outside[name] += 1
    for _, module in top.named_children():
        original = getattr(module, "original_module", None)
        if original is None:
            continue
        for node in original.graph_module.graph.nodes:
            if node.op != "call_function":
                continue
            name = _op_name(node)
            inside[name] += 1
            if name in _CONVS and len(node.args) >= 2 and _is_dequantize(node.args[0]) and _is_dequantize(node.args[1]):
                quantized_convs += 1
    q_ops = {k: v for k, v in inside.items() if "quantize_per_" in k}
    return {
        "delegate": "xnnpack",
        "delegated_partitions": partitions,
        "ops_in_delegates": sum(v for k, v in inside.items() if k not in q_ops),
        "convolutions_in_delegates": sum(inside[k] for k in _CONVS),
        "quantized_convolutions": quantized_convs,
        "quantize_dequantize_nodes_in_delegates": sum(q_ops.values()),
        "ops_outside_delegates": dict(sorted(outside.items())),
        "quantize_dequantize_outside_delegates": sum(v for k, v in outside.items() if "quantize_per_" in k),
    }


def quantize_pt2e(model, example, calibration: List[np.ndarray], log=print):
    """PT2E static INT8 with ExecuTorch's XNNPACK quantizer, observers calibrated on ``calibration``."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not calibration:
        raise EdgekitError("executorch int8 needs calibration images (--calib)")
    graph = torch.export.export(model, (example,)).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(graph, quantizer)
    log(f"executorch: calibrating the PT2E observers on {len(calibration)} images")
    with torch.no_grad():
        for batch in calibration:
            prepared(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
    return convert_pt2e(prepared)


def export_program(model, input_shape, precision: str, calibration: Optional[List[np.ndarray]] = None,
                   log=print):
    """The serialised ``.pte`` bytes of ``model`` (float, eval mode) and its lowering report."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if precision not in ("fp32", "int8"):
        raise EdgekitError(f"target executorch does not offer precision {precision} (choose from fp32, int8)")
    model = model.eval()
    example = torch.zeros(*input_shape, dtype=torch.float32)
    with torch.no_grad():
        if precision == "int8":
            model = quantize_pt2e(model, example, calibration or [], log)
        log(f"executorch: exporting and lowering to XNNPACK ({precision}; minutes on a busy CPU)")
        exported = torch.export.export(model, (example,))
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    report = lowering_report(edge)
    if report["delegated_partitions"] == 0:
        raise EdgekitError("executorch: XNNPACK took no part of the model; refusing a portable-kernels-only program")
    if precision == "int8" and report["quantized_convolutions"] == 0:
        raise EdgekitError("executorch int8: no convolution was quantized in the lowered program; nothing written")
    return edge.to_executorch().buffer, report


def build(ctx) -> dict:
    spec = ctx.source.spec
    shape = (1, spec.channels, *spec.input_size)
    data, report = export_program(ctx.torch_module(), shape, ctx.precision, ctx.calibration, ctx.log)
    (ctx.folder / MODEL_FILE).write_bytes(data)  # inside the pipeline's temporary folder, renamed on success
    fields = {"model_file": MODEL_FILE, "runtime": "executorch", "lowering": report,
              "batch": {"exported": list(shape), "larger_batches": "one program call per image"}}
    if ctx.precision == "int8":
        fields["quantization"] = {
            "tool": "executorch pt2e (torchao prepare_pt2e/convert_pt2e)", "quantizer": "XNNPACKQuantizer",
            "scheme": "static, symmetric int8, per-channel weights", "calibration": ctx.calibration_description,
            "calibration_images": len(ctx.calibration or []),
            "quantized_convolutions": report["quantized_convolutions"],
        }
        ctx.log(f"executorch int8: {report['quantized_convolutions']} of {report['convolutions_in_delegates']} "
                f"delegated convolutions quantized")
    return fields


class ExecuTorchRunner(ArtifactRunner):
    name = "executorch"

    def __init__(self, folder: Path, threads: Optional[int] = None):
        super().__init__(folder)
        try:
            import torch  # noqa: F401  (the runtime takes torch tensors)
            from executorch.runtime import Runtime
        except ImportError:
            raise MissingBackendError("running ExecuTorch artifacts", "executorch", "edge") from None
        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(int(threads))  # XNNPACK's thread pool is process-wide
        runtime = Runtime.get()
        with contextlib.redirect_stdout(io.StringIO()):  # keep stdout for results
            self.program = runtime.load_program(self.model_path)  # a verified member of the artifact
            self.method = self.program.load_method("forward")

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        outputs = [self.method.execute([torch.from_numpy(batch[i:i + 1])])[0] for i in range(batch.shape[0])]
        return torch.cat(outputs).numpy().astype(np.float32, copy=False)

    def close(self) -> None:
        self.method = self.program = None  # the method before the program it was loaded from
        super().close()


def _load(folder: Path, threads: Optional[int] = None) -> ExecuTorchRunner:
    return ExecuTorchRunner(folder, threads=threads)


SPEC = register_backend(BackendSpec(
    name="executorch", description="ExecuTorch program (.pte), XNNPACK delegate (the PyTorch edge runtime)",
    precisions=("fp32", "int8"), build=build, load=_load, package="executorch", pip_name="executorch",
    extra="edge", int8="builder", needs={"int8": ("calibration",)}, tools=("executorch", "torchao"),
    from_artifacts=(),
))
