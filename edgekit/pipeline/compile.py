"""``edgekit compile`` and ``edgekit quantize``: a checkpoint or artifact -> a verified artifact folder.

One straight line for every target, driven by its ``BackendSpec``: open the source, let the backend
build its files, quantize them with NNCF when the backend asks the pipeline to, check an INT8 budget
on real images, then measure parity against the source model and record everything in the
manifest. A failure at any step leaves no folder behind. What differs between a GMBINet checkpoint
and an MLFF backbone is a method on the source (``edgekit.pipeline.sources``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

from edgekit.artifact import artifact_writer, check_out, tool_versions, write_manifest
from edgekit.backends.base import Runner
from edgekit.backends.registry import BackendSpec, BuildContext, get_backend
from edgekit.errors import EdgekitError
from edgekit.pipeline.sources import METRICS, open_source

DEFAULT_PARITY_DATA = "synthetic:12"


def source_kind(source_path: str, as_backbone: bool = False) -> str:
    """The kind of model at ``source_path``, decided without loading it."""
    from edgekit.pipeline.mlff_source import MLFF_KIND, is_mlff_source

    return MLFF_KIND if is_mlff_source(source_path, as_backbone) else "gmbinet"


def check_request(target: str, precision: str, out: str, *, kind: str, calib: Optional[str], max_drop, metric: str,
                  val: Optional[str], force: bool) -> BackendSpec:
    """Every argument check that needs no model loaded: refused in one line before any work starts."""
    spec = get_backend(target)
    spec.check(precision, kind)
    check_out(out, force)
    if metric not in METRICS:
        raise EdgekitError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    if max_drop is not None and val is None:
        raise EdgekitError("--max-drop needs --val: validation images to measure the drop on")
    if precision == "int8" and "calibration" in spec.needs.get("int8", ()) and calib is None:
        raise EdgekitError("--precision int8 needs --calib: real images to calibrate on (an SD-900 folder, an image "
                           "folder; or 'synthetic' to calibrate on generated images)")
    if precision == "auto" and kind != "gmbinet":
        raise EdgekitError("--precision auto is for GMBINet checkpoints; give fp32, int8, ... for an MLFF backbone")
    return spec


def compile_model(source_path: str, target: str, precision: str, out: str, *, parity_data: Optional[str] = None,
                  calib: Optional[str] = None, subset: int = 100, int8_scheme: str = "pointwise",
                  max_drop: Optional[float] = None, metric: str = "iou", val: Optional[str] = None,
                  force: bool = False, threads: Optional[int] = None, log: Callable = print,
                  as_backbone: bool = False) -> dict:
    """Build one artifact folder; returns its manifest.

    ``parity_data``: images for the parity check; by default the real images given (``val``, then
    ``calib``), else a few synthetic ones. ``as_backbone``: compile ``source_path`` (a backbone
    name or weights file) as an MLFF backbone; a registry folder or a backbone name is one anyway.
    """
    kind = source_kind(source_path, as_backbone)
    spec = check_request(target, precision, out, kind=kind, calib=calib, max_drop=max_drop, metric=metric, val=val,
                         force=force)
    if parity_data is None:
        parity_data = val or (calib if calib not in (None, "synthetic") else None) or DEFAULT_PARITY_DATA
    if precision == "auto":
        from edgekit.pipeline.auto import compile_auto

        return compile_auto(source_path, target, out, parity_data=parity_data, calib=calib, subset=subset,
                            int8_scheme=int8_scheme, max_drop=max_drop, metric=metric, val=val, force=force,
                            threads=threads, log=log)
    src = open_source(source_path, as_backbone)
    if src.artifact_target is not None and spec.from_artifacts is not None \
            and src.artifact_target not in spec.from_artifacts:
        hint = f"the checkpoint or a {' / '.join(spec.from_artifacts)} artifact" if spec.from_artifacts else "the checkpoint"
        raise EdgekitError(f"{source_path} is a {src.artifact_target} artifact; compile {spec.name} from {hint}")
    parity_set = src.parity_data(parity_data)
    calib_set = src.calibration_data(calib) if precision == "int8" and spec.int8 is not None else None
    val_set = src.validation_data(val) if val else None
    calibration = src.calibration_batches(calib_set, subset) if calib_set is not None else None
    with tempfile.TemporaryDirectory() as tmp, artifact_writer(out, force=force) as folder:
        onnx_cache: List[Path] = []

        def onnx_path() -> Path:
            if not onnx_cache:
                onnx_cache.append(src.model_file(Path(tmp)))
            return onnx_cache[0]

        ctx = BuildContext(source=src, folder=folder, log=log, threads=threads,
                           # an NNCF target builds the float model, which the pipeline then quantizes
                           precision="fp32" if (precision == "int8" and spec.int8 == "nncf") else precision,
                           requested_precision=precision, calibration=calibration,
                           calibration_description=calib_set.description if calib_set is not None else None,
                           int8_scheme=int8_scheme, subset=subset, onnx=onnx_path,
                           check_batches=lambda n=16: src.check_batches(parity_set, n))
        fields = spec.build(ctx)
        files = [fields["model_file"], *fields.pop("extra_files", [])]
        quantized = precision == "int8"
        manifest = {"target": spec.name, "precision": precision, **fields, **src.base,
                    "tools": tool_versions("torch", *spec.tools, *(("nncf",) if quantized and spec.int8 == "nncf" else ()))}
        if quantized and spec.int8 == "nncf":
            manifest["quantization"] = _nncf_quantize(src, spec, folder, manifest, calibration, calib_set, subset,
                                                      int8_scheme, val_set, metric, max_drop)
        write_manifest(folder, manifest, files)  # hashes first: the runners below verify them
        if quantized and val_set is not None:  # the accuracy budget, the same for every backend
            manifest["quantization"] = {**manifest.get("quantization", {}),
                                        **src.int8_check(_load(spec, folder, threads), val_set, max_drop, threads,
                                                         metric=metric, log=log)}
        if spec.verifier is not None:
            runner, limit, method = spec.verifier(folder, precision, log)
            manifest["parity"] = {**src.parity(runner, parity_set, threads, limit=limit), "method": method}
        else:
            manifest["parity"] = src.parity(_load(spec, folder, threads), parity_set, threads)
        manifest = write_manifest(folder, manifest, files)
    log(src.summary(out, manifest))
    return manifest


def _load(spec: BackendSpec, folder: Path, threads) -> Runner:
    return spec.load(folder, **spec.load_kwargs({"threads": threads}))


def _nncf_quantize(src, spec: BackendSpec, folder: Path, manifest: dict, calibration, calib_set, subset: int,
                   scheme: str, val_set, metric: str, max_drop: Optional[float]) -> dict:
    """Replace the float model file in ``folder`` with its NNCF INT8 version (accuracy-controlled
    by NNCF itself when ``max_drop`` and validation images are given)."""
    from edgekit.compress.quantize import quantize_model

    fmt = spec.quantize_format
    path = folder / manifest["model_file"]
    items = fn = None
    if val_set is not None and max_drop is not None:
        items, fn = src.nncf_validation(val_set, metric, fmt)
    if fmt == "openvino":
        import openvino as ov

        q = quantize_model(ov.Core().read_model(str(path)), "openvino", calibration, scheme=scheme,
                           subset_size=subset, validation=items, validation_fn=fn, max_drop=max_drop)
        # The float IR's .bin is memory-mapped: write beside it and rename, never over it in place.
        staged = path.with_name("int8.xml")
        ov.save_model(q, str(staged), compress_to_fp16=False)
        os.replace(staged, path)
        os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
        manifest["inference_precision"] = "default"  # ops left in float run at the plugin's default
    elif fmt == "onnx":
        import onnx

        q = quantize_model(onnx.load(str(path)), "onnx", calibration, scheme=scheme, subset_size=subset,
                           validation=items, validation_fn=fn, max_drop=max_drop)
        onnx.save(q, str(path))
    else:
        raise EdgekitError(f"target {spec.name}: no NNCF model format declared")
    return {"tool": "nncf", "scheme": scheme, "calibration": calib_set.description,
            "calibration_images": len(calibration), "accuracy_control": fn is not None}
