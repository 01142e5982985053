"""TensorRT engines (``edgekit compile --target trt --precision fp16|int8``).

Two halves, kept apart on purpose:

* **ONNX preparation** (runs and is tested anywhere, no GPU): the ONNX model TensorRT will see is
  made here and checked numerically with ONNX Runtime on the CPU *before* TensorRT sees it.

  - fp16: the float graph converted to float16 (ONNX Runtime's copy of onnxconverter-common's
    converter, or onnxconverter-common itself), keeping the image input and mask output float32 and
    the prediction head (last conv, sigmoid and output resize) in float32.
  - int8, explicit quantization (``--int8-scheme`` = one of the NNCF schemes): the Q/DQ ONNX model
    from NNCF (``edgekit.compress.quantize``), its unsigned activation quantizers rewritten as the
    signed symmetric INT8 pairs TensorRT accepts (uint8 with zero point 0 and scale s becomes int8
    with zero point 0 and scale 255 s / 127: the same range, one bit less resolution, which is what
    TensorRT's own INT8 does with post-ReLU tensors), and its int8 weight constants expressed as
    float weights behind Q/DQ pairs (the same numbers; the form every TensorRT >= 8.5 parses).
  - int8, ``--int8-scheme trt-entropy``: TensorRT's own IInt8EntropyCalibrator2 on the float
    graph, with a calibration cache file kept in the artifact and reusable
    (``EDGEKIT_TRT_CALIB_CACHE=path``). Only TensorRT 8.5-10.x: 11 removed implicit calibration.

  The parity of the prepared ONNX with the float ONNX (max/mean |diff|, mask IoU agreement) goes
  into the manifest as ``onnx_check``.

* **Engine build** (needs ``tensorrt`` and a CUDA GPU; untested in this project's environment).
  TensorRT 8.5-10.x: builder flags (FP16, INT8) on a weakly typed network, with the entropy
  calibrator where asked for. TensorRT 11+: a strongly typed network
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``) from the typed ONNX above; no precision flags.
  The manifest records TensorRT's version, the GPU's name and compute capability; the runner refuses
  an engine built by another TensorRT version or for another GPU (``compatibility_problem``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from edgekit.errors import EdgekitError, MissingBackendError

ENGINE_FILE, ONNX_FILE, CACHE_FILE = "model.engine", "model.onnx", "calibration.cache"
ENTROPY_SCHEME = "trt-entropy"
MIN_VERSION = (8, 5)
MAX_BATCH = 32
CACHE_ENV = "EDGEKIT_TRT_CALIB_CACHE"


# ---------------------------------------------------------------------------------------------
# Versions, GPUs, and the refusal of engines built elsewhere (pure functions)
# ---------------------------------------------------------------------------------------------

def parse_version(version: str) -> Tuple[int, ...]:
    nums = re.findall(r"\d+", str(version))
    return tuple(int(n) for n in nums[:3]) if nums else ()


def api_generation(version: str) -> str:
    """``builder-flags`` (8.5-10.x: weak typing, BuilderFlag.FP16/INT8, implicit calibration) or
    ``strongly-typed`` (11+: precision comes only from the ONNX model's types and Q/DQ nodes)."""
    v = parse_version(version)
    if not v or v[:2] < MIN_VERSION:
        raise EdgekitError(f"TensorRT {version} is too old: edgekit needs TensorRT 8.5 or newer")
    return "strongly-typed" if v[0] >= 11 else "builder-flags"


def implicit_calibration_available(version: str) -> bool:
    return api_generation(version) == "builder-flags"


def compatibility_problem(manifest: dict, env: dict) -> Optional[str]:
    """Why an engine described by ``manifest`` cannot run in ``env``, or None if it can.

    ``manifest["tensorrt"]`` holds ``version``, ``gpu`` and ``compute_capability`` recorded at build
    time; ``env`` the same keys for this machine (``describe_environment()``). TensorRT engines are
    tied to the TensorRT version that built them and, by default, to the GPU model they were built on.
    """
    built = manifest.get("tensorrt") or {}
    if not built.get("version"):
        return "the manifest does not record the TensorRT version the engine was built with: rebuild it"
    where = (f"built by TensorRT {built['version']} for {built.get('gpu', 'an unknown GPU')} "
             f"(sm_{str(built.get('compute_capability', '?')).replace('.', '')})")
    fix = "rebuild it here with edgekit compile --target trt"
    if not env.get("version"):
        return f"engine {where}, but TensorRT is not installed here: pip install tensorrt"
    if parse_version(env["version"]) != parse_version(built["version"]):
        return f"engine {where}; this machine has TensorRT {env['version']}: {fix}"
    if env.get("compute_capability") is None or env.get("gpu") is None:
        return f"engine {where}, but no CUDA GPU is visible here"
    if str(env["compute_capability"]) != str(built.get("compute_capability")) or env["gpu"] != built.get("gpu"):
        return (f"engine {where}; this machine has {env['gpu']} "
                f"(sm_{str(env['compute_capability']).replace('.', '')}): {fix}")
    return None


def gpu_description(device: int = 0) -> dict:
    """Name and compute capability of a CUDA GPU, through torch (empty when none is visible)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return {"gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}
    except Exception:  # pragma: no cover - depends on the machine
        pass
    return {}


def describe_environment(device: int = 0) -> dict:
    """This machine's TensorRT version and GPU, in the keys ``compatibility_problem`` compares."""
    env: dict = {"version": None, "gpu": None, "compute_capability": None}
    try:
        import tensorrt as trt

        env["version"] = trt.__version__
    except ImportError:
        pass
    env.update(gpu_description(device))
    return env


# ---------------------------------------------------------------------------------------------
# ONNX preparation, checked with ONNX Runtime on the CPU
# ---------------------------------------------------------------------------------------------

def head_nodes(model) -> List[str]:
    """Names of the nodes from the graph outputs back to, and including, the last Conv on each path
    (for GMBINet: conv_out1, its sigmoid, the output resize and the resize's shape arithmetic)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    keep, stack, seen = [], [o.name for o in model.graph.output], set()
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node.name)
        if node.op_type != "Conv":
            stack.extend(i for i in node.input if i)
    return keep


def to_fp16_onnx(model, keep_head_float: bool = True):
    """A float16 copy of an ONNX model: I/O stay float32, the head stays float32."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:
        try:
            from onnxconverter_common.float16 import convert_float_to_float16
        except ImportError:
            raise MissingBackendError("fp16 ONNX conversion", "onnxconverter-common") from None
    import warnings

    block = head_nodes(model) if keep_head_float else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values were clipped to fp16 range" on tiny weights
        converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=block)
    return toposort(converted)  # the converter appends its Cast nodes; ONNX (and TensorRT's parser) want order


def toposort(model):
    """Reorder the graph's nodes topologically (in place; stable for nodes already in order)."""
    graph = model.graph
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    nodes, ordered = list(graph.node), []
    while nodes:
        rest = []
        for n in nodes:
            if all(i in known for i in n.input):
                ordered.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(nodes):
            raise EdgekitError(f"ONNX graph has a cycle or a missing input at node {rest[0].name}")
        nodes = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def float_types(model) -> dict:
    """{element type name: count} over the initializers: which weights a converted model holds in
    which precision (the graph-type check of a converted model)."""
    import onnx

    counts: dict = {}
    for init in model.graph.initializer:
        t = onnx.TensorProto.DataType.Name(init.data_type)
        counts[t] = counts.get(t, 0) + 1
    return counts


def to_signed_qdq(model) -> Tuple[object, int]:
    """Rewrite uint8 zero-point-0 Q/DQ pairs as int8 (scale x 255/127); refuse asymmetric ones.

    TensorRT takes only symmetric signed INT8 Q/DQ; NNCF's CPU placement marks post-ReLU activations
    unsigned. Returns the model (changed in place) and the number of nodes rewritten.
    """
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    made: dict = {}
    retyped: set = set()
    changed = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) < 3 or not node.input[2]:
            continue  # no zero point: uint8 default would be meant, but NNCF always writes one
        zp_name, scale_name = node.input[2], node.input[1]
        if zp_name not in inits or scale_name not in inits:
            raise EdgekitError(f"Q/DQ node {node.name}: scale/zero point are not constants; TensorRT needs constants")
        zp = numpy_helper.to_array(inits[zp_name])
        if np.any(zp != 0):
            raise EdgekitError(f"Q/DQ node {node.name} is asymmetric (zero point != 0); TensorRT needs symmetric INT8")
        if zp.dtype == np.int8:
            continue
        if zp.dtype != np.uint8:
            raise EdgekitError(f"Q/DQ node {node.name}: {zp.dtype} quantization; TensorRT takes int8 here")
        key = (scale_name, zp_name)
        if key not in made:
            scale = numpy_helper.to_array(inits[scale_name]).astype(np.float32) * np.float32(255.0 / 127.0)
            s_name, z_name = f"{scale_name}__s8", f"{zp_name}__s8"
            model.graph.initializer.extend([numpy_helper.from_array(scale, s_name),
                                            numpy_helper.from_array(np.zeros_like(zp, dtype=np.int8), z_name)])
            made[key] = (s_name, z_name)
        node.input[1], node.input[2] = made[key]
        if node.op_type == "QuantizeLinear":
            retyped.add(node.output[0])
        changed += 1
    for vi in model.graph.value_info:  # the quantized tensors' declared type follows the zero point
        if vi.name in retyped:
            vi.type.tensor_type.elem_type = onnx.TensorProto.INT8
    # Drop initializers nothing reads any more.
    used = {i for n in model.graph.node for i in n.input}
    for init in list(model.graph.initializer):
        if init.name not in used and init.name in inits:
            model.graph.initializer.remove(init)
    onnx.checker.check_model(model)
    return model, changed


def float_weight_qdq(model) -> Tuple[object, int]:
    """Weights stored as int8 constants behind a DequantizeLinear become float constants behind a
    QuantizeLinear -> DequantizeLinear pair with the same scale/zero point/axis: the same numbers
    (re-quantizing dequantized values gives the same integers), in the form every TensorRT since 8.5
    parses (int8 constants feeding a DequantizeLinear are newer)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, changed = [], 0
    for node in model.graph.node:
        src = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if src is None or len(node.input) < 2 or node.input[1] not in inits:
            nodes.append(node)
            continue
        q = numpy_helper.to_array(src).astype(np.float32)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32) if len(node.input) > 2 and node.input[2] else 0.0
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if np.ndim(scale) == 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), np.reshape(zp, shape) if np.ndim(zp) else zp
        fname = f"{src.name}__float"
        model.graph.initializer.append(numpy_helper.from_array(((q - zp) * scale).astype(np.float32), fname))
        qout = f"{src.name}__q"
        nodes.append(helper.make_node("QuantizeLinear", [fname, *node.input[1:]], [qout], name=f"{node.name}__weightQ",
                                      **({"axis": axis} if any(a.name == "axis" for a in node.attribute) else {})))
        node.input[0] = qout
        nodes.append(node)
        changed += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    for init in list(model.graph.initializer):
        if init.name not in used:
            model.graph.initializer.remove(init)
    return model, changed


def qdq_problems(model) -> List[str]:
    """What TensorRT would reject in a Q/DQ model: non-int8 or non-zero zero points."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
            zp = inits.get(node.input[2])
            if zp is None:
                out.append(f"{node.name}: zero point is not a constant")
                continue
            a = numpy_helper.to_array(zp)
            if a.dtype != np.int8 or np.any(a != 0):
                out.append(f"{node.name}: zero point {a.dtype} {a.ravel()[:1].tolist()}")
    return out


def onnx_parity(reference, candidate, batches: Sequence[np.ndarray], threshold: float = 0.5) -> dict:
    """Compare two ONNX models (ModelProto or path) with ONNX Runtime on the CPU, image by image."""
    import onnxruntime as ort

    def session(m):
        src = m if isinstance(m, (str, os.PathLike)) else m.SerializeToString()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        return ort.InferenceSession(src if isinstance(src, bytes) else str(src), opts,
                                    providers=["CPUExecutionProvider"])

    ra, rb = session(reference), session(candidate)
    na, nb = ra.get_inputs()[0].name, rb.get_inputs()[0].name
    max_abs, mean_abs, agree = 0.0, [], []
    for x in batches:
        a = np.asarray(ra.run(None, {na: x})[0], np.float64)
        b = np.asarray(rb.run(None, {nb: x})[0], np.float64)
        d = np.abs(a - b)
        max_abs, mean_abs = max(max_abs, float(d.max())), mean_abs + [float(d.mean())]
        ma, mb = a >= threshold, b >= threshold
        union = np.logical_or(ma, mb).sum()
        agree.append(float(np.logical_and(ma, mb).sum() / union) if union else 1.0)
    return {"images": len(batches), "runtime": "onnxruntime CPU", "max_abs_diff": max_abs,
            "mean_abs_diff": float(np.mean(mean_abs)), "mask_iou_agreement": float(np.mean(agree)),
            "min_mask_iou_agreement": float(np.min(agree))}


def prepare_onnx(onnx_path: Path, out_path: Path, precision: str, *, check_batches: Sequence[np.ndarray],
                 calibration: Optional[Sequence[np.ndarray]] = None, scheme: str = "stem-head-float",
                 subset: int = 100, log: Callable = print) -> dict:
    """Write the ONNX model TensorRT will build from to ``out_path`` and check it against the float
    ONNX with ONNX Runtime (CPU). Returns the manifest's ``onnx_check`` record."""
    import onnx

    model = onnx.load(str(onnx_path))
    report: dict = {"precision": precision}
    if precision == "fp16":
        prepared = to_fp16_onnx(model)
        report.update(conversion="float16, I/O and head (last conv, sigmoid, output resize) float32",
                      initializer_types=float_types(prepared))
    elif precision == "int8" and scheme == ENTROPY_SCHEME:
        prepared = model  # TensorRT calibrates the float graph itself
        report.update(quantization="tensorrt IInt8EntropyCalibrator2 (implicit)")
    elif precision == "int8":
        from edgekit.compress.quantize import quantize_model

        if not calibration:
            raise EdgekitError("INT8 needs calibration images")
        q = quantize_model(model, "onnx", list(calibration), scheme=scheme, subset_size=subset)
        prepared, rewritten = to_signed_qdq(q)
        prepared, weights = float_weight_qdq(prepared)
        problems = qdq_problems(prepared)
        if problems:
            raise EdgekitError(f"the Q/DQ model is not TensorRT-compatible: {problems[0]}")
        report.update(quantization=f"explicit Q/DQ from NNCF (scheme {scheme}), symmetric signed INT8",
                      qdq_nodes=sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in prepared.graph.node),
                      unsigned_rewritten=rewritten, weight_qdq_pairs=weights)
    else:
        raise EdgekitError(f"target trt does not offer precision {precision} (choose from fp16, int8)")
    onnx.save(prepared, str(out_path))
    report["parity_vs_fp32_onnx"] = onnx_parity(onnx_path, out_path, check_batches)
    p = report["parity_vs_fp32_onnx"]
    log(f"{precision} ONNX for TensorRT checked with ONNX Runtime (CPU): max |diff| {p['max_abs_diff']:.2e}, "
        f"mask IoU agreement {p['mask_iou_agreement']:.4f} on {p['images']} images")
    return report


# ---------------------------------------------------------------------------------------------
# Engine build (TensorRT; GPU)
# ---------------------------------------------------------------------------------------------

def _trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingBackendError("target trt", "tensorrt") from None
    return trt


def make_entropy_calibrator(trt, batches: Sequence[np.ndarray], cache_path: Path):
    """IInt8EntropyCalibrator2 over preprocessed batch-1 images; reads/writes ``cache_path``."""
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = iter(batches)
            self._device = None  # keeps the current batch alive while TensorRT reads it

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            try:
                x = next(self._batches)
            except StopIteration:
                return None
            self._device = torch.from_numpy(np.ascontiguousarray(x, np.float32)).cuda()
            torch.cuda.synchronize()
            return [int(self._device.data_ptr())]

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache):
            cache_path.write_bytes(bytes(cache))

    return EntropyCalibrator()


def build_engine(onnx_path: Path, engine_path: Path, precision: str, input_shape: Sequence[int], *,
                 implicit_int8: bool = False, calibration: Optional[Sequence[np.ndarray]] = None,
                 cache_path: Optional[Path] = None, max_batch: int = MAX_BATCH, workspace_gb: float = 2.0) -> dict:
    """Build and serialize a TensorRT engine; returns the build record for the manifest.

    Two optimization profiles: batch 1 (the latency case) and 2..max_batch (optimised at max_batch).
    """
    trt = _trt()
    version = trt.__version__
    api = api_generation(version)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if parse_version(version)[0] < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if api == "strongly-typed" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgekitError(f"TensorRT's ONNX parser refused the model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    name = network.get_input(0).name
    c, h, w = input_shape
    profiles = []
    for lo, opt, hi in ((1, 1, 1), (2, max_batch, max_batch)) if max_batch > 1 else ((1, 1, 1),):
        prof = builder.create_optimization_profile()
        prof.set_shape(name, (lo, c, h, w), (opt, c, h, w), (hi, c, h, w))
        config.add_optimization_profile(prof)
        profiles.append({"min": lo, "opt": opt, "max": hi})
    if api == "builder-flags":
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)  # int8: layers left in float run in fp16
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            if implicit_int8:
                if not calibration and not (cache_path and cache_path.is_file()):
                    raise EdgekitError("TensorRT entropy calibration needs calibration images or a cache")
                config.int8_calibrator = make_entropy_calibrator(trt, calibration or [], cache_path)
                calib_prof = builder.create_optimization_profile()
                calib_prof.set_shape(name, (1, c, h, w), (1, c, h, w), (1, c, h, w))
                config.set_calibration_profile(calib_prof)
    elif implicit_int8:
        raise EdgekitError(f"TensorRT {version} has no implicit INT8 calibration (removed in 11): "
                           f"use an explicit Q/DQ scheme (--int8-scheme stem-head-float)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgekitError("TensorRT failed to build the engine (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    return {"version": version, "api": api, "profiles": profiles, "input": name,
            "int8": ("implicit entropy calibration" if implicit_int8 else "explicit Q/DQ") if precision == "int8" else None,
            **gpu_description()}


def build_trt(onnx_path: Path, folder: Path, precision: str, *, spec, check_batches: Sequence[np.ndarray],
              calibration: Optional[Sequence[np.ndarray]] = None, scheme: str = "stem-head-float",
              subset: int = 100, log: Callable = print) -> dict:
    """The trt target: prepared ONNX (checked on the CPU), then the engine. Returns manifest fields."""
    trt = _trt()
    implicit = precision == "int8" and scheme == ENTROPY_SCHEME
    if implicit and not implicit_calibration_available(trt.__version__):
        raise EdgekitError(f"TensorRT {trt.__version__} has no implicit INT8 calibration (removed in 11): "
                           f"use an explicit Q/DQ scheme (--int8-scheme stem-head-float)")
    check = prepare_onnx(onnx_path, folder / ONNX_FILE, precision, check_batches=check_batches,
                         calibration=calibration, scheme=scheme, subset=subset, log=log)
    extra = [ONNX_FILE]
    cache = None
    if implicit:
        cache = folder / CACHE_FILE
        reuse = os.environ.get(CACHE_ENV)
        if reuse:
            if not Path(reuse).is_file():
                raise EdgekitError(f"{CACHE_ENV}={reuse}: no such calibration cache file")
            cache.write_bytes(Path(reuse).read_bytes())
            check["calibration_cache_reused"] = reuse
    record = build_engine(folder / ONNX_FILE, folder / ENGINE_FILE, precision, (spec.channels, *spec.input_size),
                          implicit_int8=implicit, calibration=calibration, cache_path=cache)
    if cache is not None and cache.is_file():
        extra.append(CACHE_FILE)
    return {"model_file": ENGINE_FILE, "extra_files": extra, "runtime": "tensorrt", "tensorrt": record,
            "onnx_check": check}


def build(ctx) -> dict:
    """The trt target's build: its own typed ONNX (fp16, or Q/DQ INT8 checked on the CPU), then the engine."""
    check = ctx.check_batches(16)
    fields = build_trt(ctx.onnx_path(), ctx.folder, ctx.precision, spec=ctx.source.spec, check_batches=check,
                       calibration=ctx.calibration, scheme=ctx.int8_scheme, subset=ctx.subset, log=ctx.log)
    if ctx.precision == "int8":
        fields["quantization"] = {"tool": "tensorrt" if ctx.int8_scheme == ENTROPY_SCHEME else "nncf",
                                  "scheme": ctx.int8_scheme, "calibration": ctx.calibration_description,
                                  "calibration_images": len(ctx.calibration)}
    return fields
