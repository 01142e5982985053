"""INT8 post-training quantization with NNCF, one call for OpenVINO IR and ONNX models.

Where the quantize/dequantize pairs go matters more than anything else here (measured, see
benchmarks/RESULTS.md): NNCF's default placement wraps the GMBI element-wise chains
(sigmoid * x + x) in Q/DQ pairs, which costs more than the INT8 convolutions save. The schemes:

* ``default``    - NNCF's own placement (for comparison);
* ``stem-head-float`` - NNCF's placement, but the stem conv (encoder1, which sees the normalised
                   image) and the prediction head (conv_out1 + sigmoid + resize) stay float.
* ``conv-only``  - stem and head float, and the element-wise ops (Sigmoid, Multiply, Add) are
                   ignored too, so only convolution inputs/weights are quantized.
* ``pointwise``  - conv-only, and the depthwise convolutions stay float too: only the 1x1 convs
                   (where VNNI pays most, and the output of the fusion concat) run in INT8. The
                   default: on the published checkpoint it is the fastest INT8 placement measured
                   (1.35x OpenVINO fp32) and the most accurate (-0.0009 test IoU with 100
                   class-balanced calibration images; all four are within 0.002 with those, while
                   an inclusion-only calibration set cost NNCF's default placement 0.22).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Callable, Optional, Sequence

import numpy as np

from edgekit.errors import EdgekitError, MissingBackendError
from edgekit.progress import progress_enabled, stage

SCHEMES = ("default", "stem-head-float", "conv-only", "pointwise")
FLOAT_PATTERNS = [".*encoder1.*", ".*conv_out1.*", ".*/Resize.*$"]  # stem, prediction head, resizes
ELEMENTWISE_TYPES = {"openvino": ["Sigmoid", "Multiply", "Add"], "onnx": ["Sigmoid", "Mul", "Add"]}
# Depthwise convs: a type of their own in OpenVINO; in ONNX, Conv nodes named after the modules'
# depthwise layers (GMBI conv0..3, DownBlock/DecoderFusion conv.0).
DEPTHWISE = {"openvino": {"types": ["GroupConvolution"]},
             "onnx": {"patterns": [r".*/conv[0-9]+/conv[0-9]+\.0/Conv.*", r".*/(encoder[2-5]\.0|DF[1-4])/conv/conv\.0/Conv.*"]}}


def _nncf():
    try:
        import nncf
    except ImportError:
        raise MissingBackendError("INT8 quantization", "nncf", "cpu") from None
    return nncf


def ignored_scope(scheme: str, backend: str):
    nncf = _nncf()
    if scheme not in SCHEMES:
        raise EdgekitError(f"unknown INT8 scheme {scheme!r} (choose from {', '.join(SCHEMES)})")
    if scheme == "default":
        return None
    types = ELEMENTWISE_TYPES[backend] if scheme in ("conv-only", "pointwise") else []
    patterns = list(FLOAT_PATTERNS)
    if scheme == "pointwise":
        types = types + DEPTHWISE[backend].get("types", [])
        patterns += DEPTHWISE[backend].get("patterns", [])
    return nncf.IgnoredScope(patterns=patterns, types=types, validate=False)


@contextlib.contextmanager
def _nncf_output_on_stderr():
    """NNCF logs through a handler bound to stdout and draws its rich progress bars on stdout; a
    command's stdout carries only its result (``--json``: one document). Its log goes to stderr;
    its bars too when stderr is a terminal (as edgekit's own bars, ``edgekit.progress``), else nowhere:
    a refused command's stderr is its one error line."""
    from nncf.common.logging import nncf_logger

    moved = [(h, h.stream) for h in nncf_logger.handlers
             if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.__stdout__)]
    for h, _ in moved:
        h.setStream(sys.stderr)
    show = progress_enabled()
    try:
        with contextlib.ExitStack() as stack:
            bars = sys.stderr if show else stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(bars))  # rich resolves sys.stdout when it writes
            yield
    finally:
        for h, stream in moved:
            h.setStream(stream)


def quantize_model(model, backend: str, calibration: Sequence[np.ndarray], scheme: str = "pointwise",
                   subset_size: int = 100, input_name: str = "image", validation=None,
                   validation_fn: Optional[Callable] = None, max_drop: Optional[float] = None,
                   max_iterations: int = 20, extra_ignored: Optional[dict] = None):
    """Quantize an ``openvino.Model`` or ``onnx.ModelProto``. With ``validation_fn`` and ``max_drop``,
    NNCF's accuracy-controlled quantization reverts the most harmful layers to float until the
    validation metric drops by at most ``max_drop``."""
    nncf = _nncf()
    if not calibration:
        raise EdgekitError("no calibration images")
    # Fail closed on non-finite numbers: NNCF would turn them into NaN/Inf quantizer ranges.
    for i, x in enumerate(calibration):
        if not np.isfinite(np.asarray(x)).all():
            raise EdgekitError(f"INT8 calibration: batch {i} holds NaN or Inf; nothing written")
    with stage("INT8: checking the float model for NaN/Inf"):
        check_finite_model(model, backend, "the float model")
        check_finite_outputs(model, backend, calibration[:2], "the float model", input_name)
    controlled = validation_fn is not None and max_drop is not None
    what = (f"NNCF accuracy-controlled quantization ({backend}, {min(subset_size, len(calibration))} calibration "
            f"images, {len(validation)} validation images, at most {max_iterations} restorer iterations)" if controlled
            else f"NNCF quantization ({backend}, {min(subset_size, len(calibration))} calibration images, scheme {scheme})")
    with stage(f"INT8: {what}"):
        quantized = _quantize(nncf, model, backend, calibration, scheme, subset_size, input_name, validation,
                              validation_fn, max_drop, max_iterations, extra_ignored)
    with stage("INT8: checking the quantized model for NaN/Inf"):
        check_finite_model(quantized, backend, "the INT8 model (its quantizer ranges come from the calibration "
                                               "statistics)")
        check_finite_outputs(quantized, backend, calibration[:4], "the INT8 model", input_name)
    return quantized


def _model_constants(model, backend: str):
    """(name, numpy array) of every floating constant: OpenVINO Constant ops, ONNX initializers and
    Constant nodes."""
    if backend == "openvino":
        for op in model.get_ordered_ops():
            if op.get_type_name() == "Constant" and op.get_element_type().is_real():
                yield op.get_friendly_name(), op.get_data()
    else:
        from onnx import numpy_helper

        for t in model.graph.initializer:
            yield t.name, numpy_helper.to_array(t)
        for n in model.graph.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.t is not None and a.t.dims is not None and a.HasField("t"):
                        yield n.name or n.output[0], numpy_helper.to_array(a.t)


def check_finite_model(model, backend: str, what: str) -> None:
    """Refuse, naming it, the first floating constant (weight, bias, quantizer range) with a NaN or Inf."""
    for name, arr in _model_constants(model, backend):
        arr = np.asarray(arr)
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            n = int((~np.isfinite(arr)).sum())
            kind = "NaN" if np.isnan(arr).any() else "Inf"
            raise EdgekitError(f"INT8 quantization: {what}: constant {name} holds {kind} ({n:,} of {arr.size:,} "
                               f"values); nothing written")


def check_finite_outputs(model, backend: str, batches, what: str, input_name: str = "image") -> None:
    """Run ``model`` on a few calibration batches and refuse a NaN or Inf output."""
    if backend == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(model, "CPU")
        run = lambda x: compiled(x)[0]  # noqa: E731
    else:
        import onnxruntime as ort

        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        run = lambda x: sess.run(None, {name: x})[0]  # noqa: E731
    for i, x in enumerate(batches):
        out = np.asarray(run(x))
        if not np.isfinite(out).all():
            raise EdgekitError(f"INT8 quantization: {what} gives NaN or Inf on calibration batch {i}; nothing written")


def _quantize(nncf, model, backend, calibration, scheme, subset_size, input_name, validation, validation_fn, max_drop,
              max_iterations, extra_ignored):
    if backend == "onnx":
        items = [{input_name: x} for x in calibration]
    else:
        items = list(calibration)
    calib = nncf.Dataset(items)
    scope = ignored_scope(scheme, backend)
    if extra_ignored:
        scope = nncf.IgnoredScope(patterns=(scope.patterns if scope else []) + extra_ignored.get("patterns", []),
                                  types=(scope.types if scope else []) + extra_ignored.get("types", []),
                                  validate=False)
    kwargs = dict(preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=min(subset_size, len(items)),
                  ignored_scope=scope, target_device=nncf.TargetDevice.CPU)
    if not os.environ.get("EDGEKIT_DEBUG"):
        nncf.set_log_level(40)  # errors only: NNCF's progress output would swamp the CLI
    if validation_fn is not None and max_drop is not None:
        # Bounded: each restorer iteration re-validates the model, and ranking every quantizer on the
        # whole validation set takes tens of minutes on a 2-core machine.
        restorer = nncf.AdvancedAccuracyRestorerParameters(
            max_num_iterations=max_iterations, ranking_subset_size=min(len(validation), 32), num_ranking_workers=1)
        with _nncf_output_on_stderr():
            return nncf.quantize_with_accuracy_control(
                model, calib, nncf.Dataset(validation), validation_fn=validation_fn, max_drop=max_drop,
                drop_type=nncf.DropType.ABSOLUTE, advanced_accuracy_restorer_parameters=restorer, **kwargs)
    with _nncf_output_on_stderr():
        return nncf.quantize(model, calib, **kwargs)
