"""What ``edgekit info`` reports about a checkpoint."""
from __future__ import annotations

from edgekit.data.preprocess import MAX_INPUT_SIDE
from edgekit.errors import EdgekitError
from edgekit.models.checkpoint import check_architecture, load_checkpoint, nonfinite_report, parameter_count
from edgekit.models.summary import count_macs


def checkpoint_info(path: str, size: int | None = None) -> dict:
    # Non-finite weights are reported, not refused: info is how one finds out what is wrong.
    ck = load_checkpoint(path, allow_nonfinite=True)
    if size is not None and not 1 <= size <= MAX_INPUT_SIDE:
        raise EdgekitError(f"--size {size} is outside 1..{MAX_INPUT_SIDE}")
    # Counting needs shapes only: the model on the meta device allocates nothing at any input size.
    model = check_architecture(ck.model_name, ck.config, ck.state_dict).eval()
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
                  "normalize": f"gray/{spec.scale}, (x-{spec.mean})/{spec.std}, gray->{spec.channels}ch, "
                               f"bilinear {spec.resize} to {spec.input_size[0]}x{spec.input_size[1]}"},
        "preprocess": spec.to_dict(),
        "classes": ck.classes,
        "provenance": ck.provenance,
        "metrics": ck.metrics,
        "nonfinite_weights": nonfinite_report(ck.state_dict),
    }
