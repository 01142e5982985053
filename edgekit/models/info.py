"""What ``edgekit info`` reports about a checkpoint."""
from __future__ import annotations

from edgekit.models.checkpoint import load_checkpoint, parameter_count
from edgekit.models.summary import count_macs


def checkpoint_info(path: str, size: int | None = None) -> dict:
    ck = load_checkpoint(path)
    model = ck.build()
    spec = ck.preprocess
    h, w = (size, size) if size else spec.input_size
    shape = (1, spec.channels, h, w)
    macs = count_macs(model, shape)  # eval mode: the inference path (main head only)
    return {
        "model": ck.model_name,
        "path": str(path),
        "sha256": ck.sha256,
        "config": ck.config,
        "parameters": parameter_count(ck.state_dict),
        "parameters_inference": model.inference_parameter_count(),
        "macs_input": list(shape),
        "macs": macs["macs"], "flops": macs["flops"], "elementwise_ops": macs["elementwise_ops"],
        "macs_note": "multiply-accumulates of conv and linear layers on the inference path (main head only); "
                     "FLOPs = 2 x MACs; element-wise ops counted apart",
        "input": {"shape": [spec.channels, *spec.input_size], "dtype": "float32",
                  "normalize": f"gray/{spec.scale}, (x-{spec.mean})/{spec.std}, gray->{spec.channels}ch, bilinear resize"},
        "preprocess": spec.to_dict(),
        "classes": ck.classes,
        "provenance": ck.provenance,
        "metrics": ck.metrics,
    }
