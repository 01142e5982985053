"""PyTorch -> ONNX, the common first step of every deployment target.

torch 2.13's ``torch.onnx.export`` defaults to the dynamo exporter (needs ``onnxscript``); the
TorchScript exporter (``dynamo=False``) still works and gives a plain opset-17 graph that OpenVINO
and ONNX Runtime both optimise well, so we use it. The graph is then simplified with onnxsim
(constant folding, BN already folded into convs by the exporter in eval mode).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from edgekit.errors import MissingBackendError
from edgekit.progress import stage

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "mask"


def export_onnx(model: torch.nn.Module, input_shape, path: Path, dynamic_batch: bool = True,
                simplify: bool = True, output_name: str = OUTPUT_NAME) -> Path:
    try:
        import onnx
    except ImportError:
        raise MissingBackendError("ONNX export", "onnx", "cpu") from None
    model = model.eval()
    dummy = torch.randn(*input_shape)
    dynamic_axes = {INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    with stage(f"export: PyTorch -> ONNX (opset {OPSET}{', onnxsim' if simplify else ''})"):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (dummy,), str(path), input_names=[INPUT_NAME], output_names=[output_name],
                              opset_version=OPSET, dynamic_axes=dynamic_axes, do_constant_folding=True, dynamo=False)
        if simplify:
            simplify_onnx(path, input_shape)
        onnx.checker.check_model(str(path))
    return path


def simplify_onnx(path: Path, input_shape) -> None:
    """Simplify in place with onnxsim when it is installed (an optional speed-up, not a requirement)."""
    try:
        import onnx
        import onnxsim
    except ImportError:
        return
    model = onnx.load(str(path))
    simplified, ok = onnxsim.simplify(model)
    if ok:
        onnx.save(simplified, str(path))
