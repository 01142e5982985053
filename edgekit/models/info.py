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
        "parameters_inference": _inference_params(model),
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


def _inference_params(model) -> int:
    """Parameters the eval-mode forward actually uses (the published model carries unused heads)."""
    unused = {"decoder4", "decoder3", "decoder2", "decoder1", "conv_final", "conv_out2", "conv_out3",
              "conv_out4", "conv_out5"}
    return sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] not in unused)
